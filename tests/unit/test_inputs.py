"""Serving encodes a record exactly as the site's training did, from the data card alone."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from edge_agent.data import datasets
from edge_agent.data.builtin_dicom import cache_root
from edge_agent.data.csv_source import load_csv_site
from edge_agent.data.dicom import Preprocessing
from edge_agent.data.dicom_source import DicomData, load_dicom_site
from edge_agent.data.dicom_synth import synthesize
from edge_agent.data.inputs import DataCard, FeatureInput, ImageInput, InputError
from tests.unit.test_csv_source import _config, _table


def _nearest(rows: torch.Tensor, candidates: torch.Tensor) -> float:
    """Largest distance from any of ``rows`` to its closest candidate."""
    return float(torch.cdist(rows.double(), candidates.double()).min(1).values.max())


def test_breast_cancer_vectors_are_standardised_as_in_training() -> None:
    share = datasets.share("breast-cancer", "dirichlet:0.5", 3, 1, seed=4)
    assert share.card is not None and isinstance(share.card.input, FeatureInput)
    encoding = share.card.input
    assert encoding.features[:2] == ["mean radius", "mean texture"] and len(encoding.features) == 30
    assert share.card.classes == ["malignant", "benign"]
    raw = datasets.load("breast-cancer").x
    served = torch.stack([encoding.from_vector(row.tolist()) for row in raw])
    assert _nearest(share.x_train, served) < 1e-5 and _nearest(share.x_test, served) < 1e-5


def test_csv_records_are_encoded_as_in_training(tmp_path: Path) -> None:
    path = _table(tmp_path / "ehr.csv", slice(0, 60))
    rows = list(csv.DictReader(path.open()))
    rows[3]["mean area"] = ""  # imputed in training and in serving
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = _config(
        path,
        missing="impute",
        normalization={"mean": [14.0, 19.0, 650.0], "std": [3.5, 4.3, 350.0]},
    )
    data, _ = load_csv_site(config)
    assert data.card is not None and isinstance(data.card.input, FeatureInput)
    trained = torch.cat([data.x_train, data.x_test])
    features = ["mean radius", "mean texture", "mean area", "smoker"]
    served = torch.stack([data.card.input.from_record({k: r[k] for k in features}) for r in rows])
    assert _nearest(trained, served) < 1e-6 and _nearest(served, trained) < 1e-6
    # JSON numbers work like CSV text, and the imputed value is the job's mean (0 once scaled).
    record = {"mean radius": 14.0, "mean texture": "19", "mean area": None, "smoker": "yes"}
    assert data.card.input.from_record(record).tolist() == [0, 0, 0, 0, 0, 1]


def test_dicom_uploads_are_preprocessed_as_in_training(tmp_path: Path) -> None:
    (folder,) = synthesize(tmp_path, 1, 12, seed=3, size=48)
    config = DicomData(
        folder=folder,
        classes=["normal", "lesion"],
        preprocessing=Preprocessing(size=32, mean=0.2, std=0.3),
    )
    data, _ = load_dicom_site(config)
    assert data.card == DataCard(
        input=ImageInput(preprocessing=config.preprocessing), classes=["normal", "lesion"]
    )
    assert isinstance(data.card.input, ImageInput)
    files = sorted(p for p in folder.iterdir() if p.suffix == ".dcm")
    served = torch.stack([data.card.input.from_file(p.read_bytes(), p.name) for p in files])
    trained = torch.cat([data.x_train, data.x_test])
    assert served.shape[1:] == (1, 32, 32)
    assert _nearest(trained.flatten(1), served.flatten(1)) < 1e-5


def test_the_builtin_images_fold_their_standardisation_into_the_preprocessing() -> None:
    share = datasets.share("synthetic-cxr", "iid", 1, 0, seed=0)  # every image in one share
    assert share.card is not None and isinstance(share.card.input, ImageInput)
    folder = cache_root() / "synthetic-cxr-1200x64-seed0-v1"
    files = sorted(p for p in folder.iterdir() if p.suffix == ".dcm")[:40]
    served = torch.stack([share.card.input.from_file(p.read_bytes()) for p in files])
    trained = torch.cat([share.x_train, share.x_test])
    assert _nearest(served.flatten(1), trained.flatten(1)) < 1e-5


def test_bad_inputs_name_the_field_and_what_was_expected() -> None:
    encoding = FeatureInput(
        numeric=["age", "bmi"], categorical={"sex": ["F", "M"]}, mean=[50, 25], std=[10, 5]
    )
    with pytest.raises(
        InputError, match=r"features: expected 4 values \(age, bmi, sex=F, sex=M\), got shape \[3\]"
    ):
        encoding.from_vector([1, 2, 3])
    with pytest.raises(InputError, match=r"expected a .*list of numbers"):
        encoding.from_vector(["a", 2, 3, 4])
    with pytest.raises(InputError, match="values must be finite"):
        encoding.from_vector([float("inf"), 2, 3, 4])
    with pytest.raises(InputError, match=r"record: unknown column\(s\) \['weight'\]"):
        encoding.from_record({"age": 1, "bmi": 2, "sex": "F", "weight": 3})
    with pytest.raises(InputError, match=r"record.sex 'X' is not one of \['F', 'M'\]"):
        encoding.from_record({"age": 1, "bmi": 2, "sex": "X"})
    with pytest.raises(InputError, match=r"record\.bmi is empty"):
        encoding.from_record({"age": 1, "sex": "F"})  # this encoding does not impute
    with pytest.raises(InputError, match=r"record\.age 'old' is not a number"):
        encoding.from_record({"age": "old", "bmi": 2, "sex": "F"})
    image = ImageInput(preprocessing=Preprocessing(size=16))
    with pytest.raises(
        InputError, match=r"expected a preprocessed image of shape \[1, 16, 16\].*got \[8, 8\]"
    ):
        image.from_array([[0.0] * 8] * 8)
    assert image.from_array([[0.5] * 16] * 16).shape == (1, 16, 16)
