"""How a site turns a raw record into the model's input, written down so serving does the same.

Every data source describes its encoding as a ``DataCard``: the input -- a DICOM image through
``Preprocessing``, or a feature vector with its column names, imputation, standardisation and
one-hot groups -- and the class names. The agent keeps the card with its assembled model and
export writes it into the ONNX file, so the inference service prepares an upload exactly as
training did, from the model file alone, with the same code.

Encoding problems raise ``InputError`` naming the field and what was expected; the CSV source
adds the file and row, the HTTP service turns them into 422 answers.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, model_validator

from edge_agent.data.settings import Preprocessing, VolumePreprocessing

# The decoders (pydicom, Pillow, nibabel) load with the first input of their kind: a site that
# trains on a table, or an agent that only carries a DataCard, never imports them.


class InputError(ValueError):
    """An input the model cannot take; ``reason`` is a short category for counting."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ImageInput(BaseModel):
    """Images decoded with this preprocessing: from DICOM by ``edge_agent.data.dicom``
    (``kind: dicom``, one channel) or from PNG or JPEG by ``edge_agent.data.pictures``
    (``kind: picture``, one or three channels)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["dicom", "picture"] = "dicom"
    channels: Literal[1, 3] = 1
    preprocessing: Preprocessing

    @property
    def shape(self) -> tuple[int, ...]:
        size = self.preprocessing.size
        return (self.channels, size, size)

    @property
    def file_format(self) -> str:
        """What an uploaded file must be, in words for errors."""
        return "DICOM" if self.kind == "dicom" else "PNG or JPEG"

    def from_file(self, data: bytes, source: str = "upload") -> torch.Tensor:
        """An uploaded file's bytes as the model's input (``DicomError`` or ``PictureError``)."""
        if self.kind == "picture":
            from edge_agent.data.pictures import read_picture  # noqa: PLC0415 - see the imports

            return read_picture(data, self.preprocessing, self.channels, source)
        from edge_agent.data.dicom import read_dataset, to_image  # noqa: PLC0415

        return to_image(read_dataset(io.BytesIO(data), source), self.preprocessing, source=source)

    def from_array(self, values: object, field: str = "image") -> torch.Tensor:
        """An image prepared elsewhere (already preprocessed), checked against the model's shape."""
        tensor = _float_tensor(values, field)
        given = list(tensor.shape)
        if tensor.dim() == 2 and self.channels == 1:
            tensor = tensor[None]
        if tuple(tensor.shape) != self.shape:
            raise InputError(
                "wrong image size",
                f"{field}: expected a preprocessed image of shape {list(self.shape)}"
                + (f" (or {list(self.shape[1:])})" if self.channels == 1 else "")
                + f", got {given}",
            )
        return tensor


class VolumeInput(BaseModel):
    """3-D volumes sampled onto one grid by ``edge_agent.data.volumes`` with this preprocessing;
    an upload is one NIfTI file (a DICOM series is many files: send it prepared, as ``image``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["volume"] = "volume"
    channels: Literal[1] = 1
    preprocessing: VolumePreprocessing

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, *self.preprocessing.size)

    @property
    def file_format(self) -> str:
        return "NIfTI"

    def from_file(self, data: bytes, source: str = "upload") -> torch.Tensor:
        """A NIfTI file's bytes (gzipped or not) as the model's input [1, D, H, W]."""
        from edge_agent.data.volumes import nifti_volume, to_tensor  # noqa: PLC0415

        return to_tensor(nifti_volume(data, source), self.preprocessing, source)

    def from_array(self, values: object, field: str = "image") -> torch.Tensor:
        """A volume prepared elsewhere, checked against the model's shape."""
        tensor = _float_tensor(values, field)
        given = list(tensor.shape)
        if tensor.dim() == 3:
            tensor = tensor[None]
        if tuple(tensor.shape) != self.shape:
            raise InputError(
                "wrong image size",
                f"{field}: expected a prepared volume of shape {list(self.shape)} "
                f"(or {list(self.shape[1:])}), got {given}",
            )
        return tensor


class FeatureInput(BaseModel):
    """A feature vector: numeric columns in order, then each categorical column one-hot.

    After encoding, a missing numeric value (NaN) becomes ``fill`` (refused when ``fill`` is
    None), then numeric values are standardised ``(x - mean) / std``; one-hot values are not.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["features"] = "features"
    numeric: list[str]
    categorical: dict[str, list[str]] = Field(default_factory=dict)
    mean: list[float]
    std: list[float]
    fill: list[float] | None = Field(None, description="imputed numeric values, in raw units")

    @model_validator(mode="after")
    def _lengths(self) -> FeatureInput:
        lengths = {len(self.mean), len(self.std), len(self.numeric)}
        if self.fill is not None:
            lengths.add(len(self.fill))
        if len(lengths) != 1:
            raise ValueError("mean, std and fill need one value per numeric column")
        if any(s <= 0 for s in self.std):
            raise ValueError("std: every value must be positive")
        return self

    @property
    def features(self) -> list[str]:
        """The model's input names, in order: ``age``, ..., ``sex=F``, ``sex=M``."""
        onehot = [f"{c}={v}" for c, values in self.categorical.items() for v in values]
        return [*self.numeric, *onehot]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.features),)

    def encode_record(
        self, record: Mapping[str, object], *, allow_missing: bool | None = None
    ) -> list[float]:
        """A record by column name as raw numbers; a missing numeric value becomes NaN.

        ``allow_missing`` defaults to whether this encoding imputes.
        """
        allow = self.fill is not None if allow_missing is None else allow_missing
        out = [_number(record.get(column), column, allow) for column in self.numeric]
        for column, categories in self.categorical.items():
            out += _one_hot(record.get(column), column, categories, allow)
        return out

    def from_vector(self, values: object, field: str = "features") -> torch.Tensor:
        """Raw values in feature order (one-hot groups as 0/1), before standardisation.

        Every value must be a finite number; a record (``from_record``) may leave values out.
        """
        tensor = _float_tensor(values, field)
        if tensor.dim() != 1 or len(tensor) != len(self.features):
            names = self.features
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise InputError(
                "wrong feature count",
                f"{field}: expected {len(names)} values ({shown}), got shape {list(tensor.shape)}",
            )
        return self.standardise(tensor[None])[0]

    def from_record(self, record: Mapping[str, object], field: str = "record") -> torch.Tensor:
        unknown = sorted(set(record) - set(self.numeric) - set(self.categorical))
        if unknown:
            raise InputError(
                "unknown field",
                f"{field}: unknown column(s) {unknown}; expected {[*self.numeric, *self.categorical]}",
            )
        try:
            raw = self.encode_record(record)
        except InputError as exc:
            raise InputError(exc.reason, f"{field}.{exc}") from None
        return self.standardise(torch.tensor([raw], dtype=torch.float32))[0]

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Fill missing numeric values and standardise them; one-hot columns pass unchanged."""
        width = len(self.numeric)
        numeric = x[:, :width]
        if bool(numeric.isnan().any()):
            if self.fill is None:
                raise InputError("missing value", "a numeric value is missing (NaN)")
            numeric = torch.where(numeric.isnan(), torch.tensor(self.fill), numeric)
        mean, std = torch.tensor(self.mean), torch.tensor(self.std)
        return torch.cat([(numeric - mean) / std, x[:, width:]], dim=1)


# Inputs read from an uploaded file (DICOM, PNG/JPEG, NIfTI) rather than from a record.
FileInput = ImageInput | VolumeInput
InputSpec = Annotated[ImageInput | VolumeInput | FeatureInput, Discriminator("kind")]


class DataCard(BaseModel):
    """What a model's inputs and outputs mean: the encoding above and the class names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: InputSpec
    classes: list[str] = Field(min_length=2)
    multilabel: bool = Field(
        False, description="any of the classes per record: one sigmoid per class, not a softmax"
    )

    @property
    def shape(self) -> tuple[int, ...]:
        return self.input.shape


def _number(value: object, column: str, allow_missing: bool) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        if not allow_missing:
            raise InputError("missing value", f"{column} is empty")
        return math.nan
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InputError("not a number", f"{column} {value!r} is not a number")
    shown = value.strip() if isinstance(value, str) else value
    try:
        number = float(shown)
    except ValueError:
        raise InputError("not a number", f"{column} {shown!r} is not a number") from None
    if not math.isfinite(number):
        raise InputError("not a number", f"{column} is {shown!r}")
    return number


def _one_hot(value: object, column: str, categories: Sequence[str], allow: bool) -> list[float]:
    if value is None or (isinstance(value, str) and not value.strip()):
        if not allow:
            raise InputError("missing value", f"{column} is empty")
        return [0.0] * len(categories)  # imputed: no category
    text = value.strip() if isinstance(value, str) else str(value)
    if isinstance(value, bool) or text not in categories:
        raise InputError("unknown category", f"{column} {text!r} is not one of {list(categories)}")
    return [1.0 if text == c else 0.0 for c in categories]


def _float_tensor(values: object, field: str) -> torch.Tensor:
    """Nested lists of numbers as float32; anything else is an ``InputError`` naming ``field``."""
    try:
        tensor = torch.tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(
            "not numbers", f"{field}: expected a (nested) list of numbers of equal lengths"
        ) from None
    if not bool(tensor.isfinite().all()):
        raise InputError("not numbers", f"{field}: values must be finite numbers")
    return tensor
