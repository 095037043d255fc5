"""Vertical partitions of the built-in data, their plans, and the centralized baseline.

A vertical job is compared with the same network trained in one place on the *joined* table:
the parties' aligned, standardised columns side by side, in party order -- exactly what the
joined model (``models.vertical``) reads. Trained from the job's seed in the job's batch order,
it must end with the same weights, bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from aggregator.config import JobConfig
from edge_agent.data.datasets import load
from edge_agent.data.site_data import SiteData
from edge_agent.data.synthetic import CXR_FINDINGS
from edge_agent.data.vertical import PartyTable, builtin_party
from medsplit.training import train_centralized

LABEL_PARTY = "hospital"
PARTY_NAMES = ("hospital", "imaging", "registry", "insurer", "lab")


def party_names(count: int) -> list[str]:
    """The parties of a built-in partition: the first holds the labels."""
    if not 2 <= count <= len(PARTY_NAMES):
        raise ValueError(f"a built-in vertical partition has 2 to {len(PARTY_NAMES)} parties")
    return list(PARTY_NAMES[:count])


def column_widths(columns: int, parties: int) -> list[int]:
    """How ``builtin-vertical`` divides ``columns`` between ``parties`` (contiguous blocks)."""
    return [len(block) for block in np.array_split(np.arange(columns), parties)]


def builtin_heads(
    dataset: str, parties: list[str], *, hidden: int, channels: list[int]
) -> dict[str, dict[str, Any]]:
    """Each party's head over its part of a built-in vertical partition: an MLP over a block
    of columns, or (synthetic-cxr's imaging party) a CNN of ``channels`` over the images."""
    if dataset == "synthetic-cxr":
        images = {"channels": channels, "hidden": hidden}
        heads = table_heads(parties[:1], [len(CXR_FINDINGS)], hidden)
        return heads | {parties[1]: {"name": "cnn", "args": images, "cut": "fc"}}
    widths = column_widths(load(dataset).input_shape[0], len(parties))
    return table_heads(parties, widths, hidden)


def table_heads(parties: list[str], widths: list[int], hidden: int) -> dict[str, dict[str, Any]]:
    """An MLP head per party over its ``width`` columns."""
    return {
        party: {"name": "mlp", "args": {"in_features": width, "hidden": [hidden]}, "cut": "hidden1"}
        for party, width in zip(parties, widths, strict=True)
    }


def table_plan(
    parties: list[str], widths: list[int], *, merge: str = "concat", u_shaped: bool, hidden: int = 8
) -> dict[str, Any]:
    """A vertical plan over tables: an MLP head per party (``vertical_plan``)."""
    heads = table_heads(parties, widths, hidden)
    return vertical_plan(heads, merge=merge, u_shaped=u_shaped, hidden=hidden)


def vertical_plan(
    heads: dict[str, dict[str, Any]], *, merge: str = "concat", u_shaped: bool, hidden: int = 8
) -> dict[str, Any]:
    """A vertical plan over heads of ``hidden`` outputs, an MLP top; the label party (the
    first) keeps the top's classifier when ``u_shaped``, else the aggregator holds it."""
    parties = list(heads)
    merged = hidden * len(parties) if merge == "concat" else hidden
    plan: dict[str, Any] = {
        "model": {
            "name": "vertical",
            "args": {
                "parties": heads,
                "label_party": parties[0],
                "merge": merge,
                "top": {"name": "mlp", "args": {"in_features": merged, "hidden": [hidden]}},
            },
        },
        "cut": "heads",
    }
    if u_shaped:
        plan["tail_cut"] = "hidden1"
    return plan


def builtin_tables(
    parties: list[str], *, dataset: str = "breast-cancer", coverage: float = 0.9, seed: int = 0
) -> dict[str, PartyTable]:
    """Each party's table of a built-in vertical partition (the first holds the labels)."""
    return {
        party: builtin_party(
            dataset, len(parties), index, labels=index == 0, coverage=coverage, seed=seed
        )
        for index, party in enumerate(parties)
    }


def joined(data: dict[str, SiteData], parties: list[str]) -> SiteData:
    """The parties' aligned rows side by side: the table a centralized model would read."""

    def side_by_side(part: str) -> torch.Tensor:
        tensors = [getattr(data[p], part) for p in parties]
        return torch.cat([t.reshape(len(t), -1) for t in tensors], dim=1)

    label = data[parties[0]]
    return SiteData(side_by_side("x_train"), label.y_train, side_by_side("x_test"), label.y_test)


def only(data: dict[str, SiteData], party: str) -> dict[str, SiteData]:
    """The parties' rows with every party's columns but ``party``'s blanked to zeros -- their
    mean, once standardised -- so the joined network learns from ``party``'s columns alone."""

    def blank(rows: SiteData) -> SiteData:
        return SiteData(
            torch.zeros_like(rows.x_train), rows.y_train, torch.zeros_like(rows.x_test), rows.y_test
        )

    return {p: rows if p == party else blank(rows) for p, rows in data.items()}


def centralized(config: JobConfig, table: SiteData) -> dict[str, torch.Tensor]:
    """The joined model trained in one place from the job's seed, in the job's batch order."""
    model = config.plan.model.build(seed=config.seed)
    train_centralized(
        model,
        table.x_train,
        table.y_train,
        epochs=config.rounds.count * config.training.local_epochs,
        batch_size=config.training.batch_size,
        optimizer=config.training.optimizer,
        seed=config.seed,
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
