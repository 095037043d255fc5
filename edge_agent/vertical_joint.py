"""A vertical job's joint model: every party's head and the label party's top in one ONNX graph,
assembled only when every party agreed.

No party holds the whole model at the end of a vertical job (``edge_agent.vertical_export``):
each party's head is its own, and handing it over is that party's decision. A party agrees by
setting ``joint_export: true`` in its site.yaml; its ``head.onnx`` then says so in its metadata
(``medsplit.joint: agreed``). Whoever holds ``top.onnx`` -- the label party -- and the heads the
other parties sent it builds the joint model with ``medsplit export-joint``. It is refused, naming
the party, when a head was exported without its party's agreement, belongs to another job, is
another party's than the layout says, or gives activations of another width than the top reads.

The joint model takes each party's columns as its own input (named after the party, in the
top's party order) and gives the logits: a clinician's system with all of a patient's records
at hand can score it in one call. It is checked against running the parts one after another
(each head, then the top) on random inputs before it is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import compose, helper

from medsplit.storage import atomic_write
from models.onnx_export import INPUT_NAME, OUTPUT_NAME

JOINT_AGREED = "agreed"
TOLERANCE = 1e-4


class JointExportError(ValueError):
    """The parts cannot make a joint model; the message names the party and why."""


@dataclass(frozen=True)
class Part:
    """One exported ONNX model of a vertical job and what its metadata says."""

    path: Path
    model: onnx.ModelProto
    meta: dict[str, str]

    @property
    def party(self) -> str:
        return self.meta.get("medsplit.party", "")


def load_part(path: Path, role: str) -> Part:
    """A party's ``head.onnx`` or the label party's ``top.onnx``."""
    try:
        model = onnx.load_model(str(path))
    except (OSError, DecodeError) as exc:
        raise JointExportError(f"{path}: not a readable ONNX model ({exc})") from exc
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("medsplit.mode") != "vertical" or meta.get("medsplit.role") != role:
        raise JointExportError(
            f"{path}: not a vertical party's {role}.onnx (its metadata says role "
            f"{meta.get('medsplit.role')!r}, mode {meta.get('medsplit.mode')!r})"
        )
    return Part(path, model, meta)


def _layout(top: Part) -> list[dict[str, object]]:
    try:
        layout = json.loads(top.meta["medsplit.inputs"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise JointExportError(f"{top.path}: no readable medsplit.inputs layout") from exc
    return list(layout)


def check_heads(top: Part, heads: dict[str, Part]) -> list[dict[str, object]]:
    """Every other party's head, of this job, agreed to and of the width the top reads."""
    layout = _layout(top)
    wanted = {str(e["party"]): int(e["activations"]) for e in layout if "activations" in e}  # type: ignore[call-overload]
    job = top.meta.get("medsplit.job")
    if missing := sorted(set(wanted) - set(heads)):
        raise JointExportError(f"no head for {', '.join(missing)} (--head PARTY=head.onnx)")
    if extra := sorted(set(heads) - set(wanted)):
        raise JointExportError(
            f"{', '.join(extra)}: not a party whose activations the top reads "
            f"(parties: {', '.join(wanted)})"
        )
    for party, head in heads.items():
        if head.party != party:
            raise JointExportError(f"{head.path}: the head of {head.party!r}, not of {party!r}")
        if head.meta.get("medsplit.job") != job:
            raise JointExportError(
                f"{head.path}: a head of job {head.meta.get('medsplit.job')!r}, not of {job!r}"
            )
        if head.meta.get("medsplit.joint") != JOINT_AGREED:
            raise JointExportError(
                f"{party} did not agree to a joint model: its head was exported without "
                f"joint_export: true in {party}'s site.yaml"
            )
        width = int(np.prod(json.loads(head.meta.get("medsplit.outputs", "[]")) or [0]))
        if width != wanted[party]:
            raise JointExportError(
                f"{party}'s head gives {width} activations; the top reads {wanted[party]}"
            )
    return layout


def joint_model(top: Part, heads: dict[str, Part]) -> onnx.ModelProto:
    """One graph: each party's input into its head (the label party's straight into the top),
    the activations joined in the top's layout, the top's logits out."""
    layout = check_heads(top, heads)
    graph_inputs: list[onnx.ValueInfoProto] = []
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    joined: list[str] = []
    for entry in layout:
        party = str(entry["party"])
        if "columns" in entry:  # the label party: its columns go into the top as they are
            columns = int(entry["columns"])  # type: ignore[call-overload]
            graph_inputs.append(
                helper.make_tensor_value_info(party, onnx.TensorProto.FLOAT, ["batch", columns])
            )
            joined.append(party)
            continue
        head = compose.add_prefix(heads[party].model, prefix=f"{party}/")
        (source,) = head.graph.input
        graph_inputs.append(_renamed(source, party))
        nodes.append(helper.make_node("Identity", [party], [source.name]))
        nodes.extend(head.graph.node)
        initializers.extend(head.graph.initializer)
        nodes.append(helper.make_node("Flatten", [f"{party}/{OUTPUT_NAME}"], [f"{party}/h"]))
        joined.append(f"{party}/h")
    rest = compose.add_prefix(top.model, prefix="top/")
    nodes.append(helper.make_node("Concat", joined, [f"top/{INPUT_NAME}"], axis=1))
    nodes.extend(rest.graph.node)
    initializers.extend(rest.graph.initializer)
    (output,) = rest.graph.output
    nodes.append(helper.make_node("Identity", [output.name], [OUTPUT_NAME]))
    graph = helper.make_graph(
        nodes,
        "medsplit-vertical-joint",
        graph_inputs,
        [_renamed(output, OUTPUT_NAME)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=list(top.model.opset_import))
    model.ir_version = top.model.ir_version
    inputs = [{"party": value.name, "shape": _shape(value)} for value in graph_inputs]
    kept = {k: v for k, v in top.meta.items() if k not in ("medsplit.party", "medsplit.inputs")}
    for key, value in (
        kept | {"medsplit.role": "joint", "medsplit.inputs": json.dumps(inputs)}
    ).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.checker.check_model(model, full_check=True)
    return model


def _renamed(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    copy.name = name
    return copy


def _shape(value: onnx.ValueInfoProto) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


def parity(joint: onnx.ModelProto, top: Part, heads: dict[str, Part], rows: int = 8) -> float:
    """Largest difference between the joint model and its parts run one after another."""
    import onnxruntime  # noqa: PLC0415 - heavy; only when exporting

    def session(model: onnx.ModelProto) -> onnxruntime.InferenceSession:
        return onnxruntime.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )

    generator = np.random.default_rng(0)
    whole = session(joint)
    feeds = {
        value.name: generator.standard_normal([rows, *(int(d) for d in _shape(value)[1:])]).astype(
            np.float32
        )
        for value in joint.graph.input
    }
    parts = []  # in the top's layout: the label party's columns, then each head's activations
    for name, fed in feeds.items():
        if name in heads:
            (fed,) = session(heads[name].model).run([OUTPUT_NAME], {INPUT_NAME: fed})  # noqa: PLW2901 - its activations
        parts.append(fed.reshape(rows, -1))
    (expected,) = session(top.model).run([OUTPUT_NAME], {INPUT_NAME: np.concatenate(parts, axis=1)})
    (actual,) = whole.run([OUTPUT_NAME], feeds)
    return float(np.max(np.abs(actual - expected)))


def export_joint(top_path: Path, head_paths: dict[str, Path], out: Path) -> tuple[Path, float]:
    """Check the parts, assemble, check the joint model against its parts, write it."""
    top = load_part(top_path, "top")
    heads = {party: load_part(path, "head") for party, path in head_paths.items()}
    model = joint_model(top, heads)
    diff = parity(model, top, heads)
    if not diff <= TOLERANCE:
        raise JointExportError(f"the joint model differs from its parts by {diff:.2g}")
    atomic_write(out, model.SerializeToString())
    return out, diff


__all__ = ["JOINT_AGREED", "JointExportError", "export_joint", "joint_model", "load_part"]
