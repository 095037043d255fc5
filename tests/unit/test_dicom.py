"""DICOM decoding on pydicom's own test files and on generated ones, and ``dicom-synth``."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from edge_agent.data.dicom import DicomError, Preprocessing, read_dataset, read_image, to_image
from edge_agent.data.dicom_synth import Encoding, write_dicom
from medsplit.cli import main


def _file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom ships {name}"
    return str(path)


def _native(path: str, **kw: object) -> torch.Tensor:
    """Decoded at the file's own size, so no resampling enters the comparison."""
    ds = pydicom.dcmread(path)
    return read_image(path, Preprocessing(size=int(ds.Rows), **kw))  # type: ignore[arg-type]


def test_ct_applies_the_rescale_and_spans_the_image_without_a_window() -> None:
    path = _file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds and float(ds.RescaleSlope) == 1
    physical = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )
    expected = (physical - physical.min()) / (physical.max() - physical.min())
    torch.testing.assert_close(_native(path)[0], torch.from_numpy(expected).float())


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
