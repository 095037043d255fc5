"""3-D volumes: DICOM series however a scanner stacks them, NIfTI however its affine turns,
onto one grid; broken series refused naming them; a 3-D network trained on them end to end."""

from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import pydicom
import pytest
import torch

from edge_agent.data import volume_source
from edge_agent.data.dicom_synth import synthesize_site
from edge_agent.data.inputs import VolumeInput
from edge_agent.data.settings import VolumeData, VolumePreprocessing
from edge_agent.data.site_data import DataError
from edge_agent.data.volume_source import load_volume_site
from edge_agent.data.volume_synth import CtScanner, Phantom, synthesize_volumes, write_series
from edge_agent.data.volumes import VolumeError, nifti_volume, series_volume, to_tensor
from experiments.inprocess import run_job
from medsplit.cli import main
from medsplit.transport import MemoryBroker
from medsplit.wiring import memory_connector
from tests.support.configs import job_config

CLASSES = ["normal", "lesion"]
SOFT_TISSUE = (40.0, 400.0)
GRID = VolumePreprocessing(spacing=(10.0, 10.0, 10.0), size=(16, 16, 16), window=SOFT_TISSUE)


def _expected(phantom: Phantom, pre: VolumePreprocessing) -> np.ndarray:
    """The phantom drawn directly on the output grid (RAS, about the origin), windowed."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(pre.size, pre.spacing, strict=True)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    lps = np.stack([-x, -y, z], axis=-1)
    low = SOFT_TISSUE[0] - SOFT_TISSUE[1] / 2
    return np.clip((phantom.hounsfield(lps) - low) / SOFT_TISSUE[1], 0, 1)


def _series(folder: Path, phantom: Phantom, index: int, size: int = 32) -> list[pydicom.Dataset]:
    scanner = CtScanner.for_site(index, 0, size)
    write_series(
        folder, phantom, scanner, np.random.default_rng(index), size=size,
        patient_id="P1", study_date="20240101",
    )  # fmt: skip
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


def _decoded(slices: list[pydicom.Dataset], pre: VolumePreprocessing = GRID) -> np.ndarray:
    return to_tensor(series_volume(slices, "test series"), pre, "test series")[0].numpy()


def _agree(decoded: np.ndarray, expected: np.ndarray) -> float:
    """Pearson correlation of two volumes (the body's edge is blurred by any resampling)."""
    return float(np.corrcoef(decoded.ravel(), expected.ravel())[0, 1])


def test_every_scanner_s_stacking_decodes_to_the_same_volume(tmp_path: Path) -> None:
    phantom = Phantom.draw(np.random.default_rng(7), lesion=True)
    expected = _expected(phantom, GRID)
    decoded = []
    # plain axial; listed head to feet; a 12 degree gantry tilt; rows and columns flipped --
    # each with files named in shuffled order and its own thickness, pixel size and rescale
    for index in range(4):
        slices = _series(tmp_path / f"s{index}", phantom, index)
        decoded.append(_decoded(slices))
        assert _agree(decoded[-1], expected) > 0.9, index
    for other in decoded[1:]:
        assert _agree(other, decoded[0]) > 0.9
    # InstanceNumber and file names say nothing: reversed again, the volume is the same.
    slices = _series(tmp_path / "again", phantom, 0)
    assert np.allclose(_decoded(slices[::-1]), _decoded(slices))


def _broken(tmp_path: Path, spoil: Any) -> list[pydicom.Dataset]:
    phantom = Phantom.draw(np.random.default_rng(1), lesion=False)
    slices = _series(tmp_path, phantom, 0, size=16)
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    spoil(slices)
    return slices


def _move(ds: pydicom.Dataset, mm: float) -> None:
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z + mm]


@pytest.mark.parametrize(
    ("spoil", "reason", "message"),
    [
        (lambda s: s.pop(len(s) // 2), "missing slice", "a slice is missing"),
        (
            lambda s: _move(s[5], float(s[5].SliceThickness) * 0.4),
            "uneven slice spacing",
            "a volume needs one spacing",
        ),
        (
            lambda s: setattr(s[3], "PixelSpacing", [1.0, 1.0]),
            "mixed pixel spacing",
            "slices differ in pixel spacing",
        ),
        (lambda s: s.append(s[2]), "duplicate slice", "two slices at one position"),
        (lambda s: s.__delitem__(slice(1, None)), "single slice", "a volume needs at least two"),
        (
            lambda s: delattr(s[0], "ImageOrientationPatient"),
            "no geometry",
            "without ImageOrientationPatient",
        ),
    ],
    ids=["missing", "uneven", "mixed-spacing", "duplicate", "single", "no-geometry"],
)
def test_broken_series_are_refused_naming_the_series(
    tmp_path: Path, spoil: Any, reason: str, message: str
) -> None:
    slices = _broken(tmp_path, spoil)
    with pytest.raises(VolumeError, match=message) as caught:
        _decoded(slices)
    assert caught.value.reason == reason and str(caught.value).startswith("test series: ")


def _nifti(values: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nibabel.save(nibabel.Nifti1Image(values.astype(np.float32), affine), str(path))
    return path


def test_nifti_with_a_non_diagonal_affine_decodes_like_the_world_it_maps(tmp_path: Path) -> None:
    phantom = Phantom.draw(np.random.default_rng(3), lesion=True)
    expected = _expected(phantom, GRID)
    # Voxel axes permuted and turned 30 degrees about z, 3 mm voxels, centred on the origin.
    turn = np.deg2rad(30)
    rotation = np.array(
        [[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]]
    )
    linear = rotation @ np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]]) * 3.0
    shape = np.array([60, 80, 80])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((shape - 1) / 2)
    ijk = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1)
    ras = ijk @ linear.T + affine[:3, 3]
    hu = phantom.hounsfield(ras * np.array([-1, -1, 1]))  # the phantom is drawn in LPS
    path = _nifti(hu, affine, tmp_path / "oblique.nii")
    decoded = to_tensor(nifti_volume(path, "oblique.nii"), GRID, "oblique.nii")[0].numpy()
    assert _agree(decoded, expected) > 0.9
    gzipped = tmp_path / "oblique.nii.gz"
    gzipped.write_bytes(gzip.compress(path.read_bytes()))
    served = VolumeInput(preprocessing=GRID).from_file(gzipped.read_bytes(), "upload")
    assert served.shape == (1, 16, 16, 16) and np.array_equal(served[0].numpy(), decoded)


def test_nifti_that_is_not_a_volume_is_refused(tmp_path: Path) -> None:
    four_d = _nifti(np.zeros((4, 4, 4, 3)), np.eye(4), tmp_path / "time.nii")
    with pytest.raises(VolumeError, match=r"time\.nii: a 4-D image \[4, 4, 4, 3\]"):
        nifti_volume(four_d, str(four_d))
    flat = nibabel.Nifti1Image(np.ones((4, 4, 4), np.float32), None)
    flat.header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)  # a scanner export's bug
    singular = tmp_path / "flat.nii"
    nibabel.save(flat, str(singular))
    with pytest.raises(VolumeError, match="affine is singular"):
        nifti_volume(singular, str(singular))
    with pytest.raises(VolumeError, match="upload: not a NIfTI file"):
        nifti_volume(b"not a nifti file at all" * 20, "upload")


def _site(folder: Path, **overrides: Any) -> VolumeData:
    fields: dict[str, Any] = {"folder": folder, "classes": CLASSES, "preprocessing": GRID}
    return VolumeData(**{**fields, **overrides})


def test_a_site_of_series_loads_labelled_split_by_patient_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (folder,) = synthesize_volumes(tmp_path / "synth", 1, 8, size=16)
    config = _site(folder, cache_dir=tmp_path / "cache", preprocessing=GRID.model_copy(
        update={"window": None}))  # fmt: skip
    data, summary = load_volume_site(config)
    assert data.x_train.shape[1:] == (1, 16, 16, 16)
    assert summary.loaded == 8 and summary.patients == 8 and summary.unit == "volumes"
    assert isinstance(data.card.input, VolumeInput) if data.card else False
    decoded: list[str] = []
    real = volume_source.series_volume
    monkeypatch.setattr(
        volume_source, "series_volume", lambda s, n: decoded.append(n) or real(s, n)
    )
    again, _ = load_volume_site(config)  # the range and every volume from the cache
    assert decoded == [] and torch.equal(again.x_train, data.x_train)


def test_bad_series_are_skipped_or_fatal_by_the_site_s_rule(tmp_path: Path) -> None:
    (folder,) = synthesize_volumes(tmp_path / "synth", 1, 6, size=16)
    with (folder / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    broken = folder / rows[0]["folder"]
    victim = sorted(broken.glob("*.dcm"), key=lambda p: pydicom.dcmread(p).SliceLocation)[4]
    victim.unlink()
    with pytest.raises(DataError, match=f"series {rows[0]['series_instance_uid']}.*missing"):
        load_volume_site(_site(folder))
    single = folder / "radiograph"  # a one-slice series nobody labelled
    shutil.copytree(synthesize_site(tmp_path / "cr", 0, 1), single)
    (single / "labels.csv").unlink()
    _, summary = load_volume_site(_site(folder, on_bad_input="skip"))
    assert summary.loaded == 5
    assert summary.skipped == {"missing slice": 1, "file without a label": 1}


def test_dicom_synth_volumes_train_a_3d_network_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ct"
    code = main(["dicom-synth", "--volumes", "--out", str(out), "--sites", "2",
                 "--per-site", "8", "--size", "16"])  # fmt: skip
    assert code == 0 and "CT series of" in capsys.readouterr().err
    sites = {f"site-{i}": load_volume_site(_site(out / f"site-{i}"))[0] for i in (1, 2)}
    plan = {"model": {"name": "monai.resnet18", "args": {"image_size": 16}}}
    config = job_config(
        {"job_id": "ct", "plan": plan, "mode": "split-u", "rounds": 2,
         "sites": list(sites), "batch_size": 4},
    )  # fmt: skip
    result = run_job(config, sites, memory_connector(MemoryBroker()))
    assert [record.trained for record in result.history] == [list(sites)] * 2
    losses = [loss for record in result.history for loss in record.train_loss.values()]
    assert len(losses) == 4 and all(np.isfinite(losses))
    accuracy = result.history[-1].mean()["accuracy"]
    assert accuracy is not None and 0.0 <= accuracy <= 1.0
