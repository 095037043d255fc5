"""Plans for the built-in tables: the EHR plans (``mlp-ehr``, ``mlp-ehr-u``) with a first layer
as wide as the table. One architecture per table, cut as each family of modes needs."""

from __future__ import annotations

from typing import Any

import yaml

from edge_agent.data.names import TABLE_FEATURES
from medsplit.modes import SPLIT_MODES
from models.plan_names import BUILTIN_PLANS_DIR

# The built-in plan of each dataset and family of modes (federated: centralized, local,
# fedavg, flop; split: vanilla; split-u: with a tail).
BUILTIN: dict[str, dict[str, str]] = {
    "breast-cancer": {"federated": "mlp-ehr", "split": "mlp-ehr", "split-u": "mlp-ehr-u"},
    "synthetic-cxr": {"federated": "cnn-cxr", "split": "cnn-cxr", "split-u": "cnn-cxr-u"},
}
EHR = BUILTIN["breast-cancer"]


def plan_family(mode: str) -> str:
    """The family of modes whose plan ``mode`` uses: federated, split or split-u."""
    return mode if mode in SPLIT_MODES else "federated"


def dataset_plan(dataset: str, family: str) -> str | dict[str, Any]:
    """A built-in plan's name, or for a built-in table the EHR plan made as wide as it is."""
    if dataset not in TABLE_FEATURES:
        return BUILTIN.get(dataset, EHR)[family]
    data = yaml.safe_load((BUILTIN_PLANS_DIR / f"{EHR[family]}.yaml").read_text())
    data["model"]["args"]["in_features"] = TABLE_FEATURES[dataset]
    return dict(data)
