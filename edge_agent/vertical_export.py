"""What a vertical party keeps at the end of a job, as ONNX: its own head, and at the label
party the rest of the network, which runs only with the other parties' activations.

No party holds the whole model: each head stays with its party. So each party exports

* ``head.onnx``: its own columns in, its cut-layer activations out -- what it runs when a
  patient is to be scored, sending the activations to the label party;
* at the label party, ``top.onnx`` as well: one input, the label party's own columns followed by
  every other party's activations in party order (the layout is in the model's metadata,
  ``medsplit.inputs``), out the logits. It cannot score a patient alone, by construction.

Both are checked against torch on a batch (the party's held-out rows where it has them), like
every medsplit export (``models.onnx_export``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from edge_agent.segments import EdgeSegments
from edge_agent.vertical_joint import JOINT_AGREED
from medsplit.protocol import JobSpec
from medsplit.storage import atomic_write
from models import split_model
from models.onnx_export import ExportError, export_onnx
from models.vertical import (
    VerticalArgs,
    head_outputs,
    merge_activations,
    party_input_shape,
    vertical_args,
)

log = logging.getLogger(__name__)

HEAD_FILE, TOP_FILE = "head.onnx", "top.onnx"


class LabelPartyTop(nn.Module):
    """The label party's head, the released trunk and its tail, reading one row of its own
    columns followed by the other parties' activations (party order)."""

    def __init__(
        self,
        args: VerticalArgs,
        party: str,
        head: nn.Module,
        trunk: nn.Module,
        tail: nn.Module | None,
    ) -> None:
        super().__init__()
        self.head, self.trunk = head, trunk
        self.tail = tail if tail is not None else nn.Identity()
        self.party, self.merge = party, args.merge
        self.own_shape = party_input_shape(args.parties[party])
        self.widths = {p: math.prod(s) for p, s in head_outputs(args).items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        own = math.prod(self.own_shape)
        start, hs = own, []
        for party, width in self.widths.items():
            if party == self.party:
                hs.append(self.head(x[:, :own].reshape(-1, *self.own_shape)))
            else:
                hs.append(x[:, start : start + width])
                start += width
        out: torch.Tensor = self.tail(self.trunk(merge_activations(hs, self.merge)))
        return out


def export_party(
    spec: JobSpec,
    party: str,
    *,
    segments: EdgeSegments,
    final: Mapping[str, torch.Tensor],
    state_dir: Path,
    sample: torch.Tensor,
    joint: bool = False,
) -> list[Path]:
    """Write this party's ONNX models into ``state_dir``; returns the files written. ``joint``:
    the party agrees that its head may join a joint model (``edge_agent.vertical_joint``)."""
    args = vertical_args(spec.plan.model.args)
    meta = {"medsplit.job": spec.job_id, "medsplit.party": party, "medsplit.mode": "vertical"}
    width = head_outputs(args)[party]
    head_meta = {
        "medsplit.role": "head",
        "medsplit.outputs": json.dumps(list(width)),
        "medsplit.joint": JOINT_AGREED if joint else "not agreed",
    }
    written = [_write(state_dir / HEAD_FILE, segments.head, sample, meta | head_meta)]
    if party != args.label_party:
        return written
    trunk = _released_trunk(spec, final)
    if trunk is None:
        log.info("%s: the job keeps its trunk (release_trunk: false): no top.onnx", party)
        return written
    top = LabelPartyTop(args, party, segments.head, trunk, segments.tail)
    others = [p for p in args.parties if p != party]
    layout = [{"party": party, "columns": math.prod(top.own_shape)}] + [
        {"party": p, "activations": top.widths[p]} for p in others
    ]
    filler = torch.randn((len(sample), sum(top.widths[p] for p in others)))
    joined = torch.cat([sample.reshape(len(sample), -1), filler], dim=1)
    role = meta | {"medsplit.role": "top", "medsplit.inputs": json.dumps(layout)}
    written.append(_write(state_dir / TOP_FILE, top, joined, role))
    return written


def _released_trunk(spec: JobSpec, final: Mapping[str, torch.Tensor]) -> nn.Module | None:
    trunk = split_model(spec.plan.model.build(), spec.plan).trunk
    wanted = trunk.state_dict()
    if any(key not in final for key in wanted):
        return None
    trunk.load_state_dict({key: final[key] for key in wanted})
    return trunk


def _write(path: Path, model: nn.Module, sample: torch.Tensor, meta: dict[str, str]) -> Path:
    result = export_onnx(model.eval(), sample, metadata=meta)
    atomic_write(path, result.data)
    return path


__all__ = ["HEAD_FILE", "TOP_FILE", "ExportError", "LabelPartyTop", "export_party"]
