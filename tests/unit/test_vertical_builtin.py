"""Built-in vertical partitions: blocks of a table's columns, or a clinic's table and images."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from edge_agent.data.settings import VerticalBuiltinData
from edge_agent.data.site_data import DataError
from edge_agent.data.synthetic import CXR_FINDINGS, cxr_findings
from edge_agent.data.vertical import builtin_party
from experiments.vertical_experiment import VerticalExperiment


def test_synthetic_cxr_gives_a_clinical_table_to_one_party_and_the_images_to_the_other() -> None:
    table = builtin_party("synthetic-cxr", 2, 0, labels=True, coverage=0.5, seed=4)
    images = builtin_party("synthetic-cxr", 2, 1, labels=False, coverage=0.5, seed=4)

    assert table.x.shape == (600, len(CXR_FINDINGS))
    assert table.columns == ("age_years", "pack_years", "crp_mg_l", "spo2_pct")
    assert images.x.shape == (600, 1, 64, 64) and images.y is None
    assert table.y is not None
    common = sorted(set(table.keys) & set(images.keys))
    assert 0 < len(common) < 600  # each holds a different seeded half of the 1200 patients
    # A patient's row is the same patient at both: its label is the image's, and its findings
    # are the findings drawn for that patient.
    full = builtin_party("synthetic-cxr", 2, 0, labels=True, coverage=1.0, seed=0)
    assert full.y is not None
    by_key = dict(zip(full.keys, full.y.tolist(), strict=True))
    assert [by_key[k] for k in table.keys] == table.y.tolist()
    row = {k: i for i, k in enumerate(full.keys)}
    for i, key in enumerate(table.keys[:20]):
        assert torch.equal(table.x[i], full.x[row[key]])


def test_the_clinical_findings_tell_the_classes_apart_and_are_reproducible() -> None:
    labels = torch.tensor([0, 1] * 2000)
    findings = cxr_findings(labels, seed=3)
    assert torch.equal(findings, cxr_findings(labels, seed=3))
    assert not torch.equal(findings, cxr_findings(labels, seed=4))
    gap = findings[labels == 1].mean(0) - findings[labels == 0].mean(0)
    for (name, _, shift, spread), found in zip(CXR_FINDINGS, gap.tolist(), strict=True):
        assert found == pytest.approx(shift, abs=spread / 10), name


def test_synthetic_cxr_is_held_by_two_parties_only() -> None:
    with pytest.raises(ValidationError, match="synthetic-cxr is held by 2 parties"):
        VerticalBuiltinData(dataset="synthetic-cxr", parties=3, index=2)
    with pytest.raises(DataError, match="parties must be 2, not 3"):
        builtin_party("synthetic-cxr", 3, 0, labels=True, coverage=0.5, seed=0)
    with pytest.raises(ValidationError, match=r"set parties: \[2\], not \[2, 3\]"):
        VerticalExperiment(name="v", dataset="synthetic-cxr", parties=[2, 3])


def test_breast_cancer_is_divided_in_contiguous_blocks_of_columns() -> None:
    parts = [
        builtin_party("breast-cancer", 3, i, labels=i == 0, coverage=1, seed=0) for i in range(3)
    ]
    assert [p.x.shape[1] for p in parts] == [10, 10, 10]
    assert (
        parts[0].columns[0] == "mean radius" and parts[2].columns[-1] == "worst fractal dimension"
    )
    assert parts[1].y is None and parts[2].y is None
