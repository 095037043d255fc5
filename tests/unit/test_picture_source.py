"""A folder of PNG and JPEG files as a site's data: every mode decoded or refused as
docs/data.md says, one intensity scale per site for 16-bit files, and serving reading an
upload exactly as training did."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from edge_agent.data.picture_source import load_picture_site
from edge_agent.data.pictures import read_picture
from edge_agent.data.settings import PictureData, Preprocessing
from edge_agent.data.site_data import DataError

CLASSES = ["normal", "lesion"]


def _gray(seed: int, size: int = 32, bright: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(0.4, 0.15, (size, size)) * bright, 0, 1)


def _write(
    folder: Path, pictures: dict[str, Image.Image], labels: dict[str, str], **save: Any
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, picture in pictures.items():
        picture.save(folder / name, **save)
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "patient"])
        for i, (name, label) in enumerate(labels.items()):
            writer.writerow([name, label, f"P{i // 2}"])


def _site(folder: Path, count: int = 8, mode: str = "L") -> dict[str, Image.Image]:
    pictures = {}
    for i in range(count):
        values = _gray(i)
        if mode == "RGB":
            rgb = np.stack([values, values * 0.5, 1 - values], axis=-1)
            pictures[f"img-{i:02d}.png"] = Image.fromarray((rgb * 255).astype(np.uint8), "RGB")
        else:
            pictures[f"img-{i:02d}.png"] = Image.fromarray((values * 255).astype(np.uint8), "L")
    _write(folder, pictures, {name: CLASSES[i % 2] for i, name in enumerate(pictures)})
    return pictures


def _config(folder: Path, **fields: Any) -> PictureData:
    return PictureData(
        folder=folder, classes=CLASSES, preprocessing=Preprocessing(size=16), **fields
    )


def _all(data: Any) -> torch.Tensor:
    return torch.cat([data.x_train, data.x_test])


def test_a_grayscale_folder_loads_scaled_resized_and_split_by_patient(tmp_path: Path) -> None:
    pictures = _site(tmp_path / "site")
    data, summary = load_picture_site(_config(tmp_path / "site", patient_column="patient"))
    assert summary.loaded == 8 and summary.patients == 4 and summary.intensity is not None
    assert data.x_train.shape[1:] == (1, 16, 16) and data.card is not None
    assert data.card.input.kind == "picture"
    first = torch.from_numpy(np.asarray(pictures["img-00.png"], dtype=np.float32) / 255)
    expected = torch.nn.functional.interpolate(first[None, None], size=(16, 16), mode="area")[0]
    assert any(torch.allclose(image, expected, atol=1e-6) for image in _all(data))


def test_rgb_becomes_luminance_or_stays_rgb_and_gray_is_repeated(tmp_path: Path) -> None:
    pictures = _site(tmp_path / "rgb", mode="RGB")
    gray, _ = load_picture_site(_config(tmp_path / "rgb"))
    assert gray.x_train.shape[1] == 1
    luminance = np.asarray(pictures["img-00.png"].convert("L"), dtype=np.float32) / 255
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(luminance)[None, None], size=(16, 16), mode="area"
    )[0]
    assert any(torch.allclose(image, expected, atol=1e-6) for image in _all(gray))
    colour, _ = load_picture_site(_config(tmp_path / "rgb", channels=3))
    assert colour.x_train.shape[1] == 3
    assert not torch.allclose(colour.x_train[:, 0], colour.x_train[:, 2])  # the channels differ
    _site(tmp_path / "gray")
    repeated, _ = load_picture_site(_config(tmp_path / "gray", channels=3))
    assert torch.equal(repeated.x_train[:, 0], repeated.x_train[:, 2])


def test_sixteen_bit_pictures_share_one_site_range(tmp_path: Path) -> None:
    """A brighter 16-bit image stays brighter: one range for the site, never each image's own."""
    pictures = {}
    for i in range(8):
        values = _gray(i, bright=2.0 if i % 2 else 1.0) * 4095  # 12 bits in a 16-bit PNG
        pictures[f"img-{i:02d}.png"] = Image.fromarray(values.astype(np.uint16))
    _write(tmp_path / "site", pictures, {n: CLASSES[i % 2] for i, n in enumerate(pictures)})
    data, _ = load_picture_site(_config(tmp_path / "site"))
    assert data.card is not None
    low, high = data.card.input.preprocessing.range or (0, 0)
    assert 0 <= low < 200 and 3000 < high <= 4095
    x, y = _all(data), torch.cat([data.y_train, data.y_test])
    assert float(x[y == 1].mean()) > 1.5 * float(x[y == 0].mean())


def test_bad_files_are_refused_or_skipped_naming_them(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    pictures = _site(folder)
    whole = (folder / "img-01.png").read_bytes()
    (folder / "img-01.png").write_bytes(whole[: len(whole) // 2])
    Image.fromarray((_gray(9) * 255).astype(np.uint8)).save(folder / "img-02.png", format="GIF")
    (folder / "img-03.png").write_text("not a picture")
    Image.new("L", (32, 32), 128).save(folder / "img-04.png")
    labels = {name: CLASSES[i % 2] for i, name in enumerate(pictures)} | {"gone.png": "lesion"}
    _write(folder, {}, labels)
    with pytest.raises(DataError, match=r"img-01.png: truncated or corrupt"):
        load_picture_site(_config(folder))
    data, summary = load_picture_site(_config(folder, on_bad_input="skip"))
    assert dict(summary.skipped) == {
        "truncated": 1,
        "not PNG or JPEG": 1,
        "not an image": 1,
        "constant image": 1,
        "label for a missing file": 1,
    }
    assert summary.loaded == 4 and len(data.y_train) + len(data.y_test) == 4
    assert any("img-02.png: a GIF file; expected PNG or JPEG" in p for p in summary.problems)


def test_jpeg_files_load_and_dicom_settings_are_refused(tmp_path: Path) -> None:
    pictures = {
        f"img-{i}.jpg": Image.fromarray((_gray(i) * 255).astype(np.uint8)) for i in range(6)
    }
    _write(
        tmp_path / "site", pictures, {n: CLASSES[i % 2] for i, n in enumerate(pictures)}, quality=95
    )
    data, summary = load_picture_site(_config(tmp_path / "site"))
    assert summary.loaded == 6 and data.x_train.shape[1:] == (1, 16, 16)
    with pytest.raises(ValueError, match="window and frame apply to DICOM only"):
        PictureData(folder=tmp_path, classes=CLASSES, preprocessing=Preprocessing(window=(40, 400)))


def test_serving_reads_an_uploaded_png_as_training_did(tmp_path: Path) -> None:
    pictures = _site(tmp_path / "site", mode="RGB")
    data, _ = load_picture_site(_config(tmp_path / "site", channels=3))
    assert data.card is not None
    encoding = data.card.input
    buffer = io.BytesIO()
    pictures["img-00.png"].save(buffer, format="PNG")
    served = encoding.from_file(buffer.getvalue(), "upload.png")
    trained = read_picture(
        tmp_path / "site" / "img-00.png", encoding.preprocessing, 3, "img-00.png"
    )
    assert torch.equal(served, trained) and served.shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"upload\.dcm: not a PNG or JPEG file"):
        encoding.from_file(b"DICM" * 40, "upload.dcm")
