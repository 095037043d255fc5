"""The vertical architecture: parties holding different columns of the same patients.

In vertical split learning every party runs its own *head* on its own columns (a table, images,
or both); the heads' cut-layer activations are merged (concatenated, summed or averaged) and the
*top* network -- the aggregator's trunk, and, U-shaped, the label party's tail -- reads the
merge. Written as one model, that is an ``nn.Sequential`` whose first block, ``heads``, holds
every party's head and the merge, followed by the top network's blocks. So the joined model is
an ordinary built-in architecture:

* a ``SplitPlan`` with ``cut: heads`` divides it as every split mode divides a model, its state
  keys are the distributed parts' keys (``heads.parties.<party>.*`` is that party's), and
* trained centrally on the joined table (the parties' columns side by side, flattened, in party
  order) from the same seed, it is the exact baseline the distributed job must equal.

A party's own head (``party_head``) reads its columns in their own shape; the aggregator merges
the parties' activations with ``merge_activations``, the very function the joined model calls.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

HEADS_BLOCK = "heads"
Merge = Literal["concat", "sum", "mean"]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartyHeadSpec(_Args):
    """One party's head: a built-in architecture over its own columns, kept up to ``cut``."""

    name: str = Field(description="a built-in architecture: mlp, cnn or resnet18")
    args: dict[str, Any] = Field(default_factory=dict)
    cut: str = Field(description="the architecture's last block the party keeps")


class TopSpec(_Args):
    """The network over the merged activations: the trunk (and, U-shaped, the tail)."""

    name: str = Field("mlp", description="a built-in architecture (mlp for merged vectors)")
    args: dict[str, Any] = Field(default_factory=dict)


def _two_tables() -> dict[str, PartyHeadSpec]:
    """The default: breast-cancer's 30 columns held 15 and 15 by two parties."""
    head = {"name": "mlp", "args": {"in_features": 15, "hidden": [16]}, "cut": "hidden1"}
    return {p: PartyHeadSpec.model_validate(head) for p in ("hospital", "lab")}


class VerticalArgs(_Args):
    """Parties (in merge order), which one holds the labels, the merge and the top network.
    The defaults: two parties with 15 columns each, the hospital holding the labels."""

    parties: dict[str, PartyHeadSpec] = Field(
        default_factory=_two_tables, description="each party's head, in merge order"
    )
    label_party: str = Field("hospital", description="the one party that holds the labels")
    merge: Merge = Field("concat", description="how the parties' activations are combined")
    top: TopSpec = Field(
        default_factory=lambda: TopSpec(name="mlp", args={"in_features": 32, "hidden": [16]})
    )

    @model_validator(mode="after")
    def _consistent(self) -> VerticalArgs:
        if len(self.parties) < 2:
            raise ValueError(f"parties: a vertical job has two or more, got {len(self.parties)}")
        if self.label_party not in self.parties:
            raise ValueError(
                f"label_party: {self.label_party!r} is not one of the parties "
                f"({', '.join(self.parties)})"
            )
        for party, spec in self.parties.items():
            _check_head(party, spec)
        with torch.device("meta"):
            outputs = {p: _head_output(s) for p, s in self.parties.items()}
            merged = _merged_shape(outputs, self.merge)
            _check_top(self.top, merged)
        return self

    def input_shape(self) -> tuple[int, ...]:
        """The joined table: every party's sample, flattened, side by side in party order."""
        return (sum(math.prod(party_input_shape(spec)) for spec in self.parties.values()),)


def _architecture(name: str) -> Any:
    from models import registry  # noqa: PLC0415 -- the registry registers this module

    if name == "vertical" or name not in registry.names() or registry.get(name).traced:
        allowed = [n for n in registry.names() if n != "vertical" and not registry.get(n).traced]
        raise ValueError(f"unknown architecture {name!r}; allowed: {', '.join(allowed)}")
    return registry.get(name)


def party_input_shape(spec: PartyHeadSpec) -> tuple[int, ...]:
    """One sample of the party's own columns, in their own shape (a vector, an image)."""
    return tuple(_architecture(spec.name).input_shape(spec.args))


def _check_head(party: str, spec: PartyHeadSpec) -> None:
    with torch.device("meta"):
        blocks = list(_architecture(spec.name).build(spec.args)._modules)
    if spec.cut not in blocks:
        raise ValueError(
            f"parties.{party}.cut: {spec.cut!r} is not a block of {spec.name}; allowed: "
            f"{', '.join(blocks)}"
        )


def _build_head(spec: PartyHeadSpec) -> nn.Sequential:
    """The architecture's blocks up to and including ``cut``."""
    full = _architecture(spec.name).build(spec.args)
    kept: OrderedDict[str, nn.Module] = OrderedDict()
    for name, block in full._modules.items():
        kept[name] = block
        if name == spec.cut:
            break
    return nn.Sequential(kept)


def _head_output(spec: PartyHeadSpec) -> tuple[int, ...]:
    h = _build_head(spec)(torch.zeros((1, *party_input_shape(spec))))
    return tuple(h.shape[1:])


def head_outputs(args: VerticalArgs) -> dict[str, tuple[int, ...]]:
    """Each party's activations for one sample (its head's output shape), in party order."""
    with torch.device("meta"):
        return {party: _head_output(spec) for party, spec in args.parties.items()}


def _merged_shape(outputs: Mapping[str, tuple[int, ...]], merge: Merge) -> tuple[int, ...]:
    shapes = list(outputs.values())
    if any(len(shape) != 1 for shape in shapes):
        found = ", ".join(f"{p}: {list(s)}" for p, s in outputs.items())
        raise ValueError(
            f"parties: every head must end in a vector (a flattened block) to be merged; {found}"
        )
    if merge == "concat":
        return (sum(shape[0] for shape in shapes),)
    if len(set(shapes)) > 1:
        found = ", ".join(f"{p}: {s[0]}" for p, s in outputs.items())
        raise ValueError(f"merge: {merge} needs heads of one width; {found}")
    return shapes[0]


def _check_top(top: TopSpec, merged: tuple[int, ...]) -> None:
    architecture = _architecture(top.name)
    expected = tuple(architecture.input_shape(top.args))
    if expected != merged:
        raise ValueError(
            f"top.args: the top network takes {list(expected)} but the merged activations are "
            f"{list(merged)} (set its in_features to {merged[0]})"
        )
    if HEADS_BLOCK in architecture.build(top.args)._modules:
        raise ValueError(f"top: a block may not be named {HEADS_BLOCK!r}")


def merge_activations(hs: Sequence[torch.Tensor], merge: Merge) -> torch.Tensor:
    """The parties' activations, in party order, as the top network reads them. The joined
    model and the aggregator both call this, so the two compute the same numbers."""
    if merge == "concat":
        return torch.cat(list(hs), dim=1)
    total = torch.stack(list(hs)).sum(dim=0)
    return total / len(hs) if merge == "mean" else total


class VerticalHeads(nn.Module):
    """Every party's head over its slice of the joined table, and the merge."""

    def __init__(self, args: VerticalArgs) -> None:
        super().__init__()
        self.merge: Merge = args.merge
        self.parties = nn.ModuleDict({p: _build_head(s) for p, s in args.parties.items()})
        self.shapes = {p: party_input_shape(s) for p, s in args.parties.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hs, start = [], 0
        for party, head in self.parties.items():
            shape = self.shapes[party]
            width = math.prod(shape)
            hs.append(head(x[:, start : start + width].reshape(-1, *shape)))
            start += width
        return merge_activations(hs, self.merge)


def build_vertical(args: VerticalArgs) -> nn.Sequential:
    """The joined model: ``heads`` (every party's head and the merge), then the top's blocks.
    Heads are built in party order, then the top, so one seed gives one set of weights."""
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    blocks[HEADS_BLOCK] = VerticalHeads(args)
    blocks.update(_architecture(args.top.name).build(args.top.args)._modules)
    return nn.Sequential(blocks)


class PartyHead(nn.Module):
    """One party's head, under the joined model's names (``heads.parties.<party>.*``), reading
    the party's own columns in their own shape."""

    def __init__(self, heads: VerticalHeads, party: str) -> None:
        super().__init__()
        self.party = party
        self.heads = nn.Module()
        self.heads.add_module("parties", nn.ModuleDict({party: heads.parties[party]}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parties: nn.ModuleDict = getattr(self.heads, "parties")  # noqa: B009 -- typed
        out: torch.Tensor = parties[self.party](x)
        return out


def party_head(head: nn.Module, party: str) -> PartyHead:
    """``party``'s head out of the joined model's head segment (``Sequential(heads=...)``)."""
    heads = head._modules.get(HEADS_BLOCK) if isinstance(head, nn.Sequential) else None
    if not isinstance(heads, VerticalHeads):
        raise ValueError("not the head segment of a vertical model")
    if party not in heads.parties:
        raise ValueError(f"{party!r} is not a party of this vertical model")
    return PartyHead(heads, party)


def vertical_args(model_args: Mapping[str, Any]) -> VerticalArgs:
    """The parsed arguments of a ``vertical`` model spec."""
    return VerticalArgs.model_validate(dict(model_args))


def party_prefix(party: str) -> str:
    """The state-dict prefix of ``party``'s head in the joined model."""
    return f"{HEADS_BLOCK}.parties.{party}."
