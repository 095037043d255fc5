"""DICOM decoding on pydicom's own test files and on generated ones, and ``dicom-synth``."""

from __future__ import annotations

import csv
import itertools
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from edge_agent.data.dicom import DicomError, Preprocessing, read_dataset, read_image, to_image
from edge_agent.data.dicom_source import load_dicom_folder, with_site_range
from edge_agent.data.dicom_synth import Encoding, write_dicom
from edge_agent.data.settings import DicomData
from edge_agent.data.site_data import DataError
from medsplit.cli import main


def _file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom ships {name}"
    return str(path)


def _native(path: str, **kw: object) -> torch.Tensor:
    """Decoded at the file's own size, so no resampling enters the comparison."""
    ds = pydicom.dcmread(path)
    return read_image(path, Preprocessing(size=int(ds.Rows), **kw))  # type: ignore[arg-type]


def test_a_lone_ct_without_a_window_spans_its_own_values() -> None:
    path = _file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds and float(ds.RescaleSlope) == 1
    physical = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )
    expected = (physical - physical.min()) / (physical.max() - physical.min())
    torch.testing.assert_close(_native(path)[0], torch.from_numpy(expected).float())
    # With a range (what a site's loader fixes for all its files), the range is what counts.
    low, high = float(physical.min()) - 100, float(physical.max()) + 100
    ranged = _native(path, range=(low, high))[0]
    torch.testing.assert_close(ranged, torch.from_numpy((physical - low) / (high - low)).float())


def _written(tmp_path: Path, name: str, image: np.ndarray, **header: object) -> Path:
    encoding = Encoding(12, 1.0, 0.0, "MONOCHROME2", pixel_spacing=0.15, noise=0.0)
    path = tmp_path / name
    stored = np.rint(image * 4095).astype(np.uint16)
    write_dicom(path, stored, encoding, patient_id="P", patient_name="A^B", study_date="20260101")
    if header:
        ds = pydicom.dcmread(path)
        for key, value in header.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
        ds.save_as(path)
    return path


def test_without_a_window_a_site_keeps_absolute_intensity(tmp_path: Path) -> None:
    """A brighter image of the same anatomy decodes brighter: the site fixes one range for all
    its files (each file's own min/max made them identical)."""
    rng = np.random.default_rng(0)
    anatomy = rng.uniform(0.1, 0.3, size=(16, 16))
    folder = tmp_path / "site"
    folder.mkdir()
    no_window = {"WindowCenter": None, "WindowWidth": None}
    _written(folder, "dim.dcm", anatomy, **no_window)
    _written(folder, "bright.dcm", anatomy + 0.4, **no_window)
    (folder / "labels.csv").write_text("file,label\ndim.dcm,normal\nbright.dcm,lesion\n")
    config = with_site_range(DicomData(folder=folder, classes=["normal", "lesion"]))
    assert config.preprocessing.range is not None
    x, y, _, summary = load_dicom_folder(config)
    dim_image, bright_image = x[int((y == 0).nonzero()[0])], x[int((y == 1).nonzero()[0])]
    assert float(bright_image.mean()) > float(dim_image.mean()) + 0.3
    assert summary.intensity is not None and "decoded intensity mean" in summary.describe()
    # Each file alone spans its own extent: the two would be the same picture.
    alone = [read_image(folder / n, Preprocessing(size=16)) for n in ("dim.dcm", "bright.dcm")]
    torch.testing.assert_close(alone[0], alone[1], atol=2e-3, rtol=0)


def test_an_image_that_decodes_to_a_constant_is_refused_and_window_auto_recovers_it(
    tmp_path: Path,
) -> None:
    image = np.random.default_rng(1).uniform(0.2, 0.4, size=(16, 16))
    # A stored window far above every pixel value: everything clips to black.
    broken = _written(tmp_path, "broken.dcm", image, WindowCenter=60000, WindowWidth=10)
    with pytest.raises(DicomError, match=r"broken\.dcm: decodes to a constant image .*window"):
        read_image(broken, Preprocessing(size=16))
    recovered = read_image(broken, Preprocessing(size=16, window="auto"))
    assert float(recovered.std()) > 0.01


def test_mr_uses_the_files_window_and_big_endian_decodes_identically() -> None:
    path = _file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    low, high = center - width / 2, center + width / 2
    expected = (np.clip(ds.pixel_array.astype(np.float64), low, high) - low) / (high - low)
    torch.testing.assert_close(_native(path)[0], torch.from_numpy(expected).float())
    assert torch.equal(_native(path), _native(_file("MR_small_bigendian.dcm")))
    # A configured window wins over the file's.
    wide = _native(path, window=(center, 4 * width))
    assert float(wide.max()) < float(_native(path).max())


def test_resizing_keeps_the_range_and_the_output_shape() -> None:
    image = read_image(_file("CT_small.dcm"), Preprocessing(size=32))
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert float(image.min()) >= 0 and float(image.max()) <= 1


def test_multi_frame_files_give_the_chosen_frame() -> None:
    path = _file("rtdose.dcm")
    frames = int(pydicom.dcmread(path).NumberOfFrames)
    first, second = read_image(path), read_image(path, Preprocessing(frame=1))
    assert not torch.equal(first, second)
    with pytest.raises(DicomError, match=f"frame {frames} requested, the file has {frames}"):
        read_image(path, Preprocessing(frame=frames))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("MR_truncated.dcm", "pixel data truncated or malformed"),
        ("JPEG-lossy.dcm", r"compressed as JPEG Extended .*install pylibjpeg pylibjpeg-libjpeg"),
        ("SC_rgb_jpeg_dcmtk.dcm", "photometric interpretation 'YBR_FULL'; expected MONOCHROME"),
    ],
)
def test_unusable_files_are_refused_naming_the_file_and_the_reason(name: str, message: str) -> None:
    with pytest.raises(DicomError, match=message) as info:
        read_image(_file(name))
    assert name in str(info.value)


def test_jpeg_2000_decodes_with_the_installed_handler() -> None:
    image = read_image(_file("JPEG2000.dcm"))
    assert image.shape == (1, 64, 64) and float(image.max()) > float(image.min())


def test_non_dicom_and_pixel_less_files_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.dcm"
    text.write_text("not an image")
    with pytest.raises(DicomError, match=r"notes.dcm: not a DICOM file"):
        read_dataset(text)
    ds = Dataset()
    ds.PatientID = "X"
    with pytest.raises(DicomError, match="no pixel data"):
        to_image(ds, Preprocessing(), source="report.dcm")


ENCODINGS = [
    Encoding(bits, slope, intercept, photometric, pixel_spacing=0.15, noise=0.0)
    for (bits, slope, intercept), photometric in itertools.product(
        [(12, 0.5, -1024.0), (12, 1.0, 0.0), (16, 0.05, 0.0), (16, 1.0, -1000.0)],
        ["MONOCHROME1", "MONOCHROME2"],
    )
]


@pytest.mark.parametrize(
    "encoding", ENCODINGS, ids=lambda e: f"{e.bits_stored}bit-{e.photometric}-{e.slope}"
)
def test_generated_files_round_trip_for_every_bit_depth_photometric_and_rescale(
    tmp_path: Path, encoding: Encoding
) -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, size=(24, 24))
    image[0, 0], image[0, 1] = 0.0, 1.0  # the window's two ends
    stored = encoding.stored_values(image)
    path = tmp_path / "x.dcm"
    uid = write_dicom(
        path, stored, encoding, patient_id="P1", patient_name="A^B", study_date="20260101"
    )
    ds = pydicom.dcmread(path)
    assert ds.SOPInstanceUID == uid and ds.BitsStored == encoding.bits_stored
    assert np.array_equal(ds.pixel_array, stored)  # the stored values, exactly as written
    decoded = read_image(path, Preprocessing(size=24))[0].double().numpy()
    # Bright is dense whatever the photometric; the error is the quantisation step.
    assert np.abs(decoded - image).max() <= encoding.slope / 1000 + 1e-6


def test_dicom_synth_writes_sites_that_differ(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dicom-synth", "--out", str(tmp_path), "--sites", "2", "--per-site", "6"]) == 0
    folders = capsys.readouterr().out.split()
    assert folders == [str(tmp_path / "site-1"), str(tmp_path / "site-2")]
    encodings = []
    for folder in map(Path, folders):
        rows = list(csv.DictReader((folder / "labels.csv").open()))
        assert len(rows) == 6 and set(rows[0]) == {
            "file",
            "sop_instance_uid",
            "patient_id",
            "label",
        }
        assert {r["label"] for r in rows} <= {"normal", "lesion"}
        for row in rows:
            ds = pydicom.dcmread(folder / row["file"])
            assert (
                ds.SOPInstanceUID == row["sop_instance_uid"] and ds.PatientID == row["patient_id"]
            )
            assert ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
            assert ds.StudyDate and ds.PixelSpacing and ds.Modality == "CR"
        encodings.append((ds.BitsStored, ds.PhotometricInterpretation, float(ds.RescaleSlope)))
    assert encodings[0] != encodings[1]
    assert main(["dicom-synth", "--out", str(tmp_path), "--sites", "0"]) == 2


def test_bits_above_bits_stored_are_ignored(tmp_path: Path) -> None:
    # Scanners may leave overlay or garbage bits above BitsStored; they are not part of the value.
    encoding = Encoding(12, 1.0, 0.0, "MONOCHROME2", pixel_spacing=0.15, noise=0.0)
    stored = np.full((8, 8), 0x0123, dtype=np.uint16)
    stored[0, 1] = 0x0FFF
    clean = tmp_path / "clean.dcm"
    write_dicom(clean, stored, encoding, patient_id="P", patient_name="A^B", study_date="20260101")
    stored[0, 0] = 0xF123  # same 12-bit value, high bits set
    dirty = tmp_path / "dirty.dcm"
    write_dicom(dirty, stored, encoding, patient_id="P", patient_name="A^B", study_date="20260101")
    assert int(pydicom.dcmread(dirty).pixel_array[0, 0]) == 0x123
    assert torch.equal(
        read_image(clean, Preprocessing(size=8)), read_image(dirty, Preprocessing(size=8))
    )


def test_a_site_skips_or_refuses_flat_images_like_any_other_fault(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):
        _written(folder, f"ok{i}.dcm", rng.uniform(0.2, 0.8, size=(16, 16)))
    _written(folder, "flat.dcm", rng.uniform(0.2, 0.4, size=(16, 16)), WindowCenter=60000)
    rows = "".join(f"ok{i}.dcm,{'normal' if i % 2 else 'lesion'}\n" for i in range(3))
    (folder / "labels.csv").write_text("file,label\n" + rows + "flat.dcm,normal\n")
    skip = DicomData(folder=folder, classes=["normal", "lesion"], on_bad_input="skip")
    x, _, _, summary = load_dicom_folder(skip)
    assert len(x) == 3 and summary.skipped == {"constant image": 1}
    assert "1 skipped: constant image" in summary.describe()
    with pytest.raises(DataError, match=r"flat\.dcm: decodes to a constant image"):
        load_dicom_folder(skip.model_copy(update={"on_bad_input": "fail"}))


def test_dicom_synth_files_pass_dciodvfy_and_the_command_says_what_it_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """dicom3tools' validator finds no error (Type 2 present, RescaleType, ...) in any scanner."""
    assert main(["dicom-synth", "--out", str(tmp_path), "--sites", "4", "--per-site", "2"]) == 0
    captured = capsys.readouterr()
    assert "site-1: 2 CR images 64x64 (12-bit, MONOCHROME2" in captured.err
    for path in sorted(tmp_path.rglob("*.dcm")):
        checked = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, check=False
        )
        report = checked.stdout + checked.stderr
        assert "CRImage" in report, report  # it recognised the IOD it validated
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert errors == [], (path.name, errors)
