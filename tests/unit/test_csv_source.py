"""An EHR table as a site's data: fixed encodings, missing values, bad rows, shared statistics."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from sklearn.datasets import load_breast_cancer

from edge_agent.config import SiteConfig
from edge_agent.data.csv_source import CsvData, load_csv_party, load_csv_site
from edge_agent.data.site_data import DataError
from medsplit.cli import main
from models import ConfigError

NUMERIC = ["mean radius", "mean texture", "mean area"]


def _table(path: Path, rows: slice) -> Path:
    bunch = load_breast_cancer()
    names = list(bunch.feature_names)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient", *NUMERIC, "smoker", "diagnosis"])
        for i in range(len(bunch.target))[rows]:
            values = [bunch.data[i][names.index(c)] for c in NUMERIC]
            smoker = ["yes", "no", "former"][i % 3]
            diagnosis = "benign" if bunch.target[i] else "malignant"
            writer.writerow([f"p{i // 2}", *values, smoker, diagnosis])
    return path


def _config(path: Path, **overrides: Any) -> CsvData:
    base: dict[str, Any] = {
        "path": path,
        "label_column": "diagnosis",
        "classes": ["benign", "malignant"],
        "numeric": NUMERIC,
        "categorical": {"smoker": ["no", "former", "yes"]},
        "patient_column": "patient",
    }
    base.update(overrides)
    return CsvData(**base)


def _edit(path: Path, line: int, column: str, value: str) -> None:
    rows = list(csv.DictReader(path.open()))
    rows[line - 2][column] = value
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_records_are_encoded_the_same_way_at_every_site(tmp_path: Path) -> None:
    path = _table(tmp_path / "ehr.csv", slice(0, 200))
    data, summary = load_csv_site(_config(path))
    assert summary.loaded == 200 and summary.patients == 100 and not summary.skipped
    x = torch.cat([data.x_train, data.x_test])
    assert x.shape == (200, 3 + 3)
    onehot = x[:, 3:]
    assert torch.equal(onehot.sum(1), torch.ones(200))  # exactly one category each
    assert _config(path).features[3:] == ["smoker=no", "smoker=former", "smoker=yes"]
    # Both images of a patient (rows 2k and 2k+1) sit on the same side of the split.
    assert len(data.y_train) % 2 == 0 and len(data.y_test) % 2 == 0


def test_statistics_combined_from_site_sums_equal_the_pooled_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sums = []
    for index, rows in enumerate((slice(0, 250), slice(250, 569))):
        table = _table(tmp_path / f"site-{index}.csv", rows)
        site = {
            "site_id": f"s{index}",
            "job_id": "j",
            "data": {"source": "csv", **json.loads(_config(table).model_dump_json())},
        }
        config_path = tmp_path / f"site-{index}.yaml"
        config_path.write_text(yaml.safe_dump(site))
        assert main(["data-stats", "--config", str(config_path)]) == 0
        sums_path = tmp_path / f"sums-{index}.json"
        sums_path.write_text(capsys.readouterr().out)
        assert "mean radius" not in sums_path.read_text()  # aggregates only
        sums.append(str(sums_path))
    assert main(["data-stats", "--combine", *sums]) == 0
    norm = json.loads(capsys.readouterr().out)["normalization"]
    pooled = torch.tensor(load_breast_cancer().data[:, [0, 1, 3]])
    torch.testing.assert_close(torch.tensor(norm["mean"]), pooled.mean(0).float())
    torch.testing.assert_close(torch.tensor(norm["std"]), pooled.std(0).float())
    # With the shared statistics every site standardises alike.
    data, _ = load_csv_site(_config(tmp_path / "site-0.csv", normalization=norm))
    assert abs(float(data.x_train[:, 0].mean())) < 0.5


def test_missing_values_follow_the_policy(tmp_path: Path) -> None:
    path = _table(tmp_path / "ehr.csv", slice(0, 40))
    _edit(path, 5, "mean texture", "")
    with pytest.raises(DataError, match=r"ehr.csv, row 5: mean texture is empty"):
        load_csv_site(_config(path))
    data, summary = load_csv_site(_config(path, missing="drop"))
    assert summary.skipped == {"missing value (dropped)": 1} and summary.loaded == 39
    norm = {"mean": [14.0, 19.0, 650.0], "std": [3.5, 4.3, 350.0]}
    data, summary = load_csv_site(_config(path, missing="impute", normalization=norm))
    assert summary.loaded == 40
    x = torch.cat([data.x_train, data.x_test])
    assert bool((x[:, 1] == 0).any())  # the imputed mean, standardised


@pytest.mark.parametrize(
    ("column", "value", "message", "reason"),
    [
        (
            "smoker",
            "sometimes",
            r"row 7: smoker 'sometimes' is not one of \['no', 'former', 'yes'\]",
            "unknown category",
        ),
        ("diagnosis", "unsure", r"row 7: diagnosis 'unsure' is not one of", "unknown label value"),
        ("mean area", "large", r"row 7: mean area 'large' is not a number", "not a number"),
    ],
)
def test_bad_rows_are_named_or_skipped(
    tmp_path: Path, column: str, value: str, message: str, reason: str
) -> None:
    path = _table(tmp_path / "ehr.csv", slice(0, 40))
    _edit(path, 7, column, value)
    with pytest.raises(DataError, match=message):
        load_csv_site(_config(path))
    _, summary = load_csv_site(_config(path, on_bad_input="skip"))
    assert summary.skipped == {reason: 1} and summary.loaded == 39


def test_wrong_columns_and_configs_are_refused(tmp_path: Path) -> None:
    path = _table(tmp_path / "ehr.csv", slice(0, 40))
    with pytest.raises(DataError, match=r"missing column\(s\) \['age'\]; found \['patient'"):
        load_csv_site(_config(path, numeric=[*NUMERIC, "age"]))
    only_benign = _table(tmp_path / "benign.csv", slice(19, 22))  # rows 19..21 are all benign
    with pytest.raises(DataError, match=r"no row of class\(es\) \['malignant'\]"):
        load_csv_site(_config(only_benign, patient_column=None))
    site = {"site_id": "a", "job_id": "j"}
    for data, field in [
        (
            {"source": "csv", "path": "x.csv", "label_column": "y", "classes": ["a", "b"]},
            "numeric or categorical",
        ),
        (
            {
                "source": "csv",
                "path": "x.csv",
                "label_column": "y",
                "classes": ["a", "b"],
                "numeric": ["y"],
            },
            "used twice",
        ),
    ]:
        with pytest.raises(ConfigError, match=field):
            SiteConfig.from_mapping({**site, "data": data})


def _party(tmp_path: Path, *, labels: bool, secret: bytes = b"0123456789abcdef-shared") -> CsvData:
    table = tmp_path / "party.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mrn", "age", "smoker", "diagnosis"])
        for i in range(12):
            writer.writerow(
                [f"MRN{i:03d}", 40 + i, ["yes", "no"][i % 2], ["benign", "malignant"][i % 2]]
            )
    (tmp_path / "secret").write_bytes(secret)
    fields: dict[str, Any] = {
        "path": table,
        "key_column": "mrn",
        "key_secret_file": tmp_path / "secret",
        "numeric": ["age"],
        "categorical": {"smoker": ["yes", "no"]},
    }
    if labels:
        fields |= {"label_column": "diagnosis", "classes": ["benign", "malignant"]}
    return CsvData.model_validate(fields)


def test_a_vertical_party_table_is_read_by_key_with_or_without_labels(tmp_path: Path) -> None:
    with_labels, _ = load_csv_party(_party(tmp_path, labels=True))
    without, summary = load_csv_party(_party(tmp_path, labels=False))
    assert with_labels.keys == without.keys == tuple(f"MRN{i:03d}" for i in range(12))
    assert with_labels.y is not None and with_labels.y.tolist() == [i % 2 for i in range(12)]
    assert without.y is None and summary.loaded == 12
    assert without.x.shape == (12, 3) and without.standardised == 1  # age; smoker one-hot
    aligned = without.aligned(list(range(12)), seed=0, holdout=0.25, standardise=True)
    assert abs(float(aligned.x_train[:, 0].mean())) < 1e-6  # age standardised ...
    assert set(aligned.x_train[:, 1:].unique().tolist()) <= {0.0, 1.0}  # ... one-hot kept


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"key_secret_file": None}, "key_column and key_secret_file: a vertical party gives both"),
        ({"key_column": None}, "label_column: required (only a vertical party"),
    ],
)
def test_a_vertical_party_config_missing_its_key_or_secret_is_refused(
    tmp_path: Path, change: dict[str, Any], said: str
) -> None:
    fields = _party(tmp_path, labels=False).model_dump() | change
    with pytest.raises(ValueError, match="vertical party") as refused:
        CsvData.model_validate(fields)
    assert said in str(refused.value)


def test_a_short_shared_secret_is_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds 5 bytes; the parties' shared secret needs at least"):
        load_csv_party(_party(tmp_path, labels=False, secret=b"short"))


def test_data_check_says_a_vertical_party_can_align_or_names_the_repeated_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    party = _party(tmp_path, labels=True)
    site = {"site_id": "hospital", "job_id": "j", "data": {"source": "csv"}}
    site["data"] |= json.loads(party.model_dump_json())
    config_path = tmp_path / "site.yaml"
    config_path.write_text(yaml.safe_dump(site))
    assert main(["data-check", "--config", str(config_path)]) == 0
    said = capsys.readouterr().out
    assert "hospital: 12 patients (with labels), input [3]" in said
    assert "alignment: openmined-psi 2." in said  # a real intersection ran through it

    rows = party.path.read_text().splitlines()
    party.path.write_text("\n".join([*rows, rows[3]]) + "\n")  # MRN002 again
    assert main(["data-check", "--config", str(config_path)]) == 2
    refused = capsys.readouterr().err.strip().splitlines()
    assert len(refused) == 1 and "repeat" in refused[0] and "mrn" in refused[0], refused
