"""What a site's trained model is, as string metadata that travels inside the model file.

One ``ModelCard`` is written twice: into the safetensors metadata of the assembled site model
(``state_dir/site-model.safetensors``) and into the ``metadata_props`` of its ONNX export. The
inference service reads it back from the ONNX file to know the input encoding and class names,
so a ``model.onnx`` needs nothing beside it. Keys are namespaced ``medsplit.*``; values are
plain strings or JSON, readable by any ONNX tool (``onnx.load(...).metadata_props``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from edge_agent.data.inputs import DataCard
from medsplit import __version__
from models import SplitPlan

PREFIX = "medsplit."


class CardError(ValueError):
    """A model file without a (valid) medsplit model card; the message names the key."""


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    site_id: str
    mode: str
    plan: SplitPlan
    data: DataCard
    weights_sha256: str | None = None
    version: str = __version__

    @model_validator(mode="after")
    def _shapes_agree(self) -> ModelCard:
        model_shape = tuple(self.plan.model.input_shape)
        if tuple(self.data.shape) != model_shape:
            raise ValueError(
                f"the data's input shape {list(self.data.shape)} differs from the model's "
                f"{list(model_shape)}"
            )
        classes = self.plan.model.args.get("num_classes")
        if classes is not None and classes != len(self.data.classes):
            raise ValueError(
                f"the model has {classes} outputs but the data names {len(self.data.classes)} "
                f"classes {self.data.classes}"
            )
        return self

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.plan.model.input_shape)

    def to_metadata(self) -> dict[str, str]:
        """String key/values; the architecture and input shape are repeated for other tools."""
        fields = {
            "job_id": self.job_id,
            "site_id": self.site_id,
            "mode": self.mode,
            "plan": self.plan.model_dump_json(),
            "architecture": self.plan.model.model_dump_json(),
            "input_shape": json.dumps(list(self.input_shape)),
            "preprocessing": self.data.input.model_dump_json(),
            "classes": json.dumps(self.data.classes),
            "version": self.version,
        }
        if self.weights_sha256 is not None:
            fields["weights_sha256"] = self.weights_sha256
        if self.data.multilabel:  # absent: one class per record, as every card before it
            fields["multilabel"] = "true"
        return {PREFIX + key: value for key, value in fields.items()}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: str) -> ModelCard:
        """Read a card back; ``CardError`` naming ``source`` and the key if it is not one."""

        def get(key: str) -> str:
            value = metadata.get(PREFIX + key)
            if value is None:
                raise CardError(f"{source}: not a medsplit model (metadata {PREFIX}{key} missing)")
            return value

        try:
            fields = {
                "job_id": get("job_id"),
                "site_id": get("site_id"),
                "mode": get("mode"),
                "plan": json.loads(get("plan")),
                "data": {
                    "input": json.loads(get("preprocessing")),
                    "classes": json.loads(get("classes")),
                    "multilabel": metadata.get(PREFIX + "multilabel") == "true",
                },
                "weights_sha256": metadata.get(PREFIX + "weights_sha256"),
                "version": get("version"),
            }
            return cls.model_validate(fields)
        except json.JSONDecodeError as exc:
            raise CardError(f"{source}: metadata is not valid JSON ({exc})") from None
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'card'}: {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            raise CardError(f"{source}: invalid model card: {problems}") from None
