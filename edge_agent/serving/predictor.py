"""An exported site model in onnxruntime, and the requests it can answer.

The ``Predictor`` knows everything from the ONNX file: the model card in its metadata says how
to turn a DICOM file, a record or a feature vector into the model's input (the same code the
site trained with: ``edge_agent.data.inputs``) and what the outputs are called. The execution provider
is an explicit choice: ``cpu``, or ``cuda`` -- which fails with a clear error when this
onnxruntime has no CUDA provider or cannot start it, instead of quietly running on the CPU.
No HTTP here: ``edge_agent.serving.app`` puts it on the network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime
import torch

from edge_agent.data.dicom import DicomError
from edge_agent.data.inputs import FeatureInput, FileInput, InputError
from edge_agent.data.pictures import PictureError
from edge_agent.data.volumes import VolumeError
from edge_agent.model_card import CardError, ModelCard
from models.onnx_export import INPUT_NAME, OUTPUT_NAME

Device = Literal["cpu", "cuda"]
PROVIDERS: dict[str, str] = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
JSON_KEYS = ("features", "record", "image")


class ModelLoadError(RuntimeError):
    """The model file cannot be served: missing, not ONNX, or not a medsplit export."""


class ProviderUnavailable(RuntimeError):
    """The requested execution provider is not available in this onnxruntime or machine."""


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]
    labels: list[str] | None = None  # multi-label: every class at or above one half

    def as_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"class": self.label, "probabilities": self.probabilities}
        if self.labels is not None:
            answer["labels"] = self.labels
        return answer


def providers_for(device: Device, available: Sequence[str] | None = None) -> list[str]:
    """The providers to ask for; never a silent fallback from CUDA to the CPU."""
    available = list(onnxruntime.get_available_providers() if available is None else available)
    wanted = PROVIDERS[device]
    if wanted not in available:
        raise ProviderUnavailable(
            f"device {device}: this onnxruntime ({onnxruntime.__version__}) has no {wanted} "
            f"(available: {', '.join(available)}). For CUDA install onnxruntime-gpu in place of "
            "onnxruntime, with a matching CUDA and cuDNN."
        )
    return [wanted]


class Predictor:
    def __init__(self, path: str | Path, *, device: Device = "cpu", threads: int = 0) -> None:
        """Load ``path`` for ``device``; ``threads`` (0: onnxruntime's choice) per inference."""
        self.path = Path(path)
        self.device = device
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: no such model file")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        providers = providers_for(device)
        try:
            self.session = onnxruntime.InferenceSession(
                str(self.path), options, providers=providers
            )
        except Exception as exc:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) share no base
            raise ModelLoadError(f"{self.path}: onnxruntime cannot load it ({exc})") from None
        if providers[0] not in self.session.get_providers():
            raise ProviderUnavailable(
                f"device {device}: onnxruntime could not start {providers[0]} (check the CUDA and "
                f"cuDNN libraries); it offered {self.session.get_providers()}"
            )
        metadata = self.session.get_modelmeta().custom_metadata_map
        try:
            self.card = ModelCard.from_metadata(metadata, str(self.path))
        except CardError as exc:
            raise ModelLoadError(str(exc)) from None
        self._check_signature()
        self.opset = _opset(self.path)

    def _check_signature(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        names = ([i.name for i in inputs], [o.name for o in outputs])
        if names != ([INPUT_NAME], [OUTPUT_NAME]):
            raise ModelLoadError(
                f"{self.path}: expected one input {INPUT_NAME!r} and one output {OUTPUT_NAME!r}, "
                f"found {names}"
            )
        shape = tuple(inputs[0].shape[1:])
        if shape != self.card.input_shape:
            raise ModelLoadError(
                f"{self.path}: the graph takes {list(shape)} but its card says "
                f"{list(self.card.input_shape)}"
            )

    # -- inputs ----------------------------------------------------------------------------------

    @property
    def classes(self) -> list[str]:
        return self.card.data.classes

    def from_file(self, data: bytes, source: str = "upload") -> torch.Tensor:
        """An uploaded image file: DICOM, PNG/JPEG or NIfTI, as the model was trained on."""
        encoding = self.card.data.input
        if not isinstance(encoding, FileInput):
            raise InputError(
                "wrong input kind",
                f"{source}: this model takes a feature vector ({len(encoding.features)} values), "
                "not an image; send JSON with 'features' or 'record'",
            )
        unusable = f"not a usable {encoding.file_format} file"
        try:
            return encoding.from_file(data, source)
        except (DicomError, PictureError, VolumeError) as exc:
            raise InputError(unusable, str(exc)) from None
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            # pydicom's LUT code on attributes a malformed file gets wrong
            raise InputError(
                unusable, f"{source}: cannot decode the image ({type(exc).__name__}: {exc})"
            ) from None

    def from_json(self, item: object, field: str = "body") -> torch.Tensor:
        """One JSON instance: ``{"features": [...]}``, ``{"record": {...}}`` or ``{"image": ...}``."""
        if not isinstance(item, Mapping) or len(set(item) & set(JSON_KEYS)) != 1 or len(item) != 1:
            raise InputError(
                "bad request body",
                f"{field}: expected an object with exactly one of {list(JSON_KEYS)}",
            )
        (key, value), encoding = next(iter(item.items())), self.card.data.input
        where = f"{field}.{key}"
        if isinstance(encoding, FileInput):
            if key != "image":
                raise InputError(
                    "wrong input kind",
                    f"{where}: this model takes images {list(encoding.shape)}: upload "
                    f"{encoding.file_format}, or send 'image' already preprocessed",
                )
            return encoding.from_array(value, where)
        if key == "image":
            raise InputError(
                "wrong input kind", f"{where}: this model takes 'features' or 'record', not images"
            )
        if key == "features":
            return encoding.from_vector(value, where)
        if not isinstance(value, Mapping):
            raise InputError("bad request body", f"{where}: expected an object of column: value")
        return encoding.from_record(value, where)

    # -- inference -------------------------------------------------------------------------------

    def logits(self, batch: torch.Tensor) -> np.ndarray:
        """The model's outputs for a batch of prepared inputs, shape (batch, classes)."""
        x = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})
        result: np.ndarray = logits
        return result

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """Class probabilities for a batch of prepared inputs, shape (batch, classes): a
        softmax, or for a multi-label model each class's own sigmoid."""
        return probabilities(self.logits(batch), self.card.data.multilabel)

    def predict(self, inputs: Sequence[torch.Tensor]) -> list[Prediction]:
        if not inputs:
            return []
        probabilities = self.probabilities(torch.stack(list(inputs)))
        return [
            Prediction(
                self.classes[int(row.argmax())],
                {name: float(p) for name, p in zip(self.classes, row, strict=True)},
                [n for n, p in zip(self.classes, row, strict=True) if p >= 0.5]
                if self.card.data.multilabel
                else None,
            )
            for row in probabilities
        ]

    def describe(self) -> dict[str, Any]:
        """What ``GET /metadata`` shows: the card, the input, the runtime."""
        encoding = self.card.data.input
        described: dict[str, Any] = {
            "job_id": self.card.job_id,
            "site_id": self.card.site_id,
            "mode": self.card.mode,
            "architecture": self.card.plan.model.model_dump(),
            "input_shape": list(self.card.input_shape),
            "classes": self.classes,
            "preprocessing": encoding.model_dump(),
            "weights_sha256": self.card.weights_sha256,
            "medsplit_version": self.card.version,
            "opset": self.opset,
            "providers": self.session.get_providers(),
        }
        if isinstance(encoding, FeatureInput):
            described["features"] = encoding.features
        return described


def probabilities(logits: np.ndarray, multilabel: bool = False) -> np.ndarray:
    """Softmax over the classes, or a sigmoid per class for a multi-label model."""
    if multilabel:
        result: np.ndarray = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        return result
    return softmax(logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    result: np.ndarray = (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
    return result


def _opset(path: Path) -> int | None:
    """The default-domain opset the model was exported with."""
    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
