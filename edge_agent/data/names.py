"""The names a site.yaml or ``medsplit demo`` may use for built-in data and partitions.

Plain Python, no pydantic, no torch: ``medsplit --help`` lists them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# The real patient tables (edge_agent.data.clinical_tables) by name, with their feature counts.
TABLE_FEATURES = {"gbsg2-recurrence": 10, "whas500-death": 14, "flchain-death": 9}
DATASETS = ("breast-cancer", "synthetic-cxr", *TABLE_FEATURES)
DatasetName = Literal[
    "breast-cancer", "synthetic-cxr", "gbsg2-recurrence", "whas500-death", "flchain-death"
]


def check_name(name: str) -> str:
    """``name`` if it is a built-in dataset; ``ValueError`` listing the allowed ones otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    return name


SCHEMES = "iid, dirichlet:ALPHA, shards:K, feature-shift"


@dataclass(frozen=True)
class Scheme:
    kind: str  # "iid" | "dirichlet" | "shards" | "feature-shift"
    alpha: float = 0.0
    shards: int = 0

    @property
    def shifts_features(self) -> bool:
        return self.kind == "feature-shift"


def parse_scheme(scheme: str) -> Scheme:
    """Parse a partition name; ``ValueError`` says what was expected."""
    if scheme in ("iid", "feature-shift"):
        return Scheme(scheme)
    kind, _, value = scheme.partition(":")
    if kind == "dirichlet":
        try:
            alpha = float(value)
        except ValueError:
            raise ValueError(
                f"partition {scheme!r}: ALPHA must be a number, e.g. dirichlet:0.5"
            ) from None
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"partition {scheme!r}: ALPHA must be positive")
        return Scheme("dirichlet", alpha=alpha)
    if kind == "shards":
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"partition {scheme!r}: K must be a whole number >= 1, e.g. shards:2")
        return Scheme("shards", shards=int(value))
    raise ValueError(f"unknown partition {scheme!r}; allowed: {SCHEMES}")
