"""A site's DICOM folder as training data: labels, validation, skip/fail, patients, privacy."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
import yaml
from pydicom.data import get_testdata_file

from edge_agent.config import SiteConfig
from edge_agent.data import dicom_source as source
from edge_agent.data.dicom_source import DicomData, load_dicom_site
from edge_agent.data.dicom_synth import synthesize, synthesize_site
from edge_agent.data.site_data import DataError, split_by_patient
from edge_agent.main import load_data
from experiments.inprocess import run_job
from medsplit.cli import main
from medsplit.transport import MemoryBroker
from medsplit.wiring import memory_connector
from models import ConfigError
from tests.support.configs import job_config

CLASSES = ["normal", "lesion"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, sites=2, per_site=24, seed=1)
    return out


def _site(tmp_path: Path, synth: Path) -> Path:
    folder = tmp_path / "site"
    shutil.copytree(synth / "site-1", folder)
    return folder


def _rows(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((folder / "labels.csv").open()))


def _write_rows(folder: Path, rows: list[dict[str, str]]) -> None:
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _data(folder: Path, **overrides: Any) -> DicomData:
    return DicomData(folder=folder, classes=CLASSES, **overrides)


def test_a_site_folder_loads_with_every_key_and_splits_by_patient(synth: Path) -> None:
    folder = synth / "site-1"
    rows = _rows(folder)
    data, summary = load_dicom_site(_data(folder))
    assert summary.loaded == len(rows) and not summary.skipped
    assert summary.patients == len({r["patient_id"] for r in rows}) < len(rows)
    assert len(data.y_train) + len(data.y_test) == len(rows)
    assert data.x_train.shape[1:] == (1, 64, 64)
    expected = sorted(CLASSES.index(r["label"]) for r in rows)
    assert sorted(torch.cat([data.y_train, data.y_test]).tolist()) == expected
    by_uid, _ = load_dicom_site(_data(folder, key="sop_instance_uid"))
    assert torch.equal(by_uid.x_train, data.x_train)
    # Patient-level labels: every image of a patient takes the patient's label.
    patient_rows = [{"patient_id": r["patient_id"], "label": r["label"]} for r in rows]
    patient_table = folder.parent / "patients.csv"
    with patient_table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["patient_id", "label"])
        writer.writeheader()
        writer.writerows(patient_rows)
    by_patient, _ = load_dicom_site(_data(folder, key="patient_id", labels=patient_table))
    assert len(by_patient.y_train) + len(by_patient.y_test) == len(rows)


def test_no_patient_is_on_both_sides_of_the_split() -> None:
    patients = [f"p{i // 3}" for i in range(60)]  # three images per patient
    train, test = split_by_patient(patients, 0.25, seed=4)
    train_patients = {patients[i] for i in train.tolist()}
    test_patients = {patients[i] for i in test.tolist()}
    assert train_patients and test_patients and not train_patients & test_patients
    assert len(train) + len(test) == 60


def _spoil(folder: Path) -> None:
    """One of every kind of bad input."""
    rows = _rows(folder)
    truncated = folder / rows[0]["file"]
    truncated.write_bytes(truncated.read_bytes()[:2000])
    (folder / "notes.txt").write_text("not an image")
    shutil.copy(get_testdata_file("JPEG-lossy.dcm", download=False), folder / "compressed.dcm")  # type: ignore[arg-type]
    rows[1]["label"] = "pneumothorax"
    rows.append({**rows[2], "file": "gone.dcm"})
    _write_rows(folder, rows)


def test_bad_inputs_are_skipped_and_counted_by_reason(tmp_path: Path, synth: Path) -> None:
    folder = _site(tmp_path, synth)
    total = len(_rows(folder))
    _spoil(folder)
    data, summary = load_dicom_site(_data(folder, on_bad_input="skip"))
    assert summary.skipped == {
        "truncated": 1,
        "unknown label value": 1,
        "file without a label": 2,  # notes.txt and compressed.dcm
        "label for a missing file": 1,
    }
    assert summary.loaded == total - 2 == len(data.y_train) + len(data.y_test)
    assert "skipped: truncated" in summary.describe() and "image-" not in summary.describe()


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (
            lambda f, rows: (f / rows[0]["file"]).write_bytes(b"x" * 300),
            r"image-\d+\.dcm: not a DICOM file",
        ),
        (
            lambda f, rows: rows.__setitem__(1, {**rows[1], "label": "pneumo"}),
            "label 'pneumo' is not one of the job's classes",
        ),
        (
            lambda f, rows: rows.append({**rows[0], "file": "gone.dcm"}),
            "'gone.dcm' has a label but no readable file",
        ),
        (lambda f, rows: rows.pop(0), r"image-\d+\.dcm: no row for file"),
        (lambda f, rows: [r.update(label="normal") for r in rows], "no image of class 'lesion'"),
    ],
)
def test_under_fail_the_first_problem_stops_loading_naming_the_file(
    tmp_path: Path, synth: Path, spoil: Any, message: str
) -> None:
    folder = _site(tmp_path, synth)
    rows = _rows(folder)
    spoil(folder, rows)
    _write_rows(folder, rows)
    with pytest.raises(DataError, match=message):
        load_dicom_site(_data(folder))


def test_wrong_columns_and_configs_are_refused_clearly(tmp_path: Path, synth: Path) -> None:
    folder = _site(tmp_path, synth)
    with pytest.raises(DataError, match=r"labels.csv: missing column\(s\) \['diagnosis'\]; found"):
        load_dicom_site(_data(folder, label_column="diagnosis"))
    site = {"site_id": "a", "job_id": "j"}
    config = SiteConfig.from_mapping(
        {**site, "data": {"source": "dicom", "folder": str(folder), "classes": CLASSES}}
    )
    assert isinstance(config.data, DicomData) and config.data.preprocessing.size == 64
    with pytest.raises(ConfigError, match="classes"):
        SiteConfig.from_mapping({**site, "data": {"source": "dicom", "folder": str(folder)}})
    with pytest.raises(ConfigError, match="source"):
        SiteConfig.from_mapping({**site, "data": {"source": "pacs"}})


def test_no_dicom_header_value_is_ever_published(tmp_path: Path) -> None:
    sites = {}
    for index in range(2):
        folder = synthesize_site(tmp_path, index, 20, seed=2)
        sites[f"site-{index + 1}"] = load_dicom_site(_data(folder))[0]
    secrets = set()
    for path in tmp_path.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        secrets |= {
            str(ds.PatientID),
            str(ds.PatientName),
            str(ds.StudyDate),
            str(ds.SOPInstanceUID),
        }
        secrets.add(path.name)
    config = job_config(
        {
            "job_id": "j",
            "plan": "cnn-cxr-u",
            "mode": "split-u",
            "rounds": 1,
            "sites": list(sites),
            "batch_size": 16,
        }
    )
    broker = MemoryBroker()
    run_job(config, sites, memory_connector(broker))
    published = [p for client, _, p in broker.published if not client.startswith("aggregator")]
    assert published and secrets
    for secret in secrets:
        needle = secret.encode()
        assert not any(needle in payload for payload in published), secret


def test_the_decoded_image_cache_skips_decoding_until_a_file_changes(
    tmp_path: Path, synth: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _site(tmp_path, synth)
    config = _data(folder, cache_dir=tmp_path / "cache")
    first, _ = load_dicom_site(config)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == len(_rows(folder))

    decoded: list[Path] = []
    real = source.read_dataset

    def counting(path: Path) -> Any:
        decoded.append(Path(path))
        return real(path)

    monkeypatch.setattr(source, "read_dataset", counting)
    again, _ = load_dicom_site(config)
    assert decoded == [] and torch.equal(again.x_train, first.x_train)
    changed = folder / _rows(folder)[0]["file"]
    changed.write_bytes(changed.read_bytes())  # same content, new modification time
    load_dicom_site(config)
    assert decoded == [changed]
    # Another window is another image: nothing cached applies.
    decoded.clear()
    load_dicom_site(
        _data(folder, cache_dir=tmp_path / "cache", preprocessing={"window": [500, 600]})
    )
    assert len(decoded) == len(_rows(folder))


def test_an_agent_loads_its_dicom_folder_or_refuses_to_start(
    tmp_path: Path, synth: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = {"site_id": "a", "job_id": "j"}
    data = {"source": "dicom", "folder": str(synth / "site-2"), "classes": CLASSES}
    loaded = load_data(SiteConfig.from_mapping({**site, "data": data}))
    assert len(loaded.y_train) + len(loaded.y_test) == len(_rows(synth / "site-2"))
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump({**site, "data": {**data, "folder": str(tmp_path / "none")}}))
    assert main(["agent", "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'none'}: not a folder")
