"""The vertical architecture, its plans and its jobs' settings: what is built, what is refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from experiments.vertical import column_widths, party_names, table_plan
from models import split_model
from models.config_errors import ConfigError
from models.plan import SplitPlan
from models.vertical import merge_activations, party_head, party_prefix
from tests.support.configs import job_config


def _plan(**changes: Any) -> dict[str, Any]:
    plan = table_plan(party_names(3), column_widths(30, 3), u_shaped=True)
    plan["model"]["args"] |= changes
    return plan


@pytest.mark.parametrize("merge", ["concat", "sum", "mean"])
def test_the_parties_heads_merged_are_the_joined_models_heads(merge: str) -> None:
    parties = party_names(3)
    plan = SplitPlan.from_mapping(
        table_plan(parties, column_widths(30, 3), merge=merge, u_shaped=True)
    )
    parts = split_model(plan.model.build(seed=5), plan)
    x = torch.randn(7, 30)
    columns = torch.split(x, column_widths(30, 3), dim=1)
    heads = [
        party_head(parts.head, p)(c.contiguous()) for p, c in zip(parties, columns, strict=True)
    ]
    assert torch.equal(merge_activations(heads, merge), parts.head(x))
    for party in parties:  # each party holds its own head, under the joined model's names
        keys = set(party_head(parts.head, party).state_dict())
        assert keys and all(k.startswith(party_prefix(party)) for k in keys)
    assert plan.trunk == ("hidden1",) and plan.tail == ("classifier",)


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"label_party": "clinic"}, "label_party: 'clinic' is not one of the parties"),
        ({"merge": "sum"}, "top.args: the top network takes [24] but the merged activations"),
        (
            {"parties": {"hospital": {"name": "mlp", "args": {"in_features": 30}, "cut": "x"}}},
            "parties: a vertical job has two or more",
        ),
        (
            {
                "label_party": "a",
                "parties": {p: {"name": "mlp", "cut": "hidden9"} for p in ("a", "b")},
            },
            "parties.a.cut: 'hidden9' is not a block of mlp",
        ),
        (
            {
                "label_party": "a",
                "parties": {p: {"name": "vertical", "cut": "heads"} for p in ("a", "b")},
            },
            "unknown architecture 'vertical'",
        ),
    ],
)
def test_a_vertical_plan_that_cannot_work_is_refused_naming_the_field(
    changes: dict[str, Any], said: str
) -> None:
    with pytest.raises(ConfigError, match=None) as refused:
        SplitPlan.from_mapping(_plan(**changes))
    assert said in str(refused.value)


def _job(**overrides: Any) -> dict[str, Any]:
    return {
        "job_id": "job-v",
        "plan": table_plan(party_names(2), column_widths(30, 2), u_shaped=False),
        "mode": "vertical",
        "sites": party_names(2),
    } | overrides


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        ({"orchestration": "sequential"}, "a vertical job's parties step together"),
        ({"sites": ["hospital", "clinic"]}, "a vertical job's sites are its plan's parties"),
        ({"training": {"micro_batches": 2}}, "vertical steps are not pipelined"),
        ({"rounds": {"count": 2, "min_sites": 1}}, "every party of a vertical job is needed"),
        ({"normalization": {"mean": [0.0] * 30, "std": [1.0] * 30}}, "each party standardises"),
        ({"plan": "mlp-ehr"}, "mode vertical needs model.name: vertical"),
        ({"mode": "split", "orchestration": "parallel"}, "the vertical architecture is for mode"),
    ],
)
def test_a_vertical_job_config_that_cannot_work_is_refused(
    overrides: dict[str, Any], said: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        job_config(_job(**overrides))
    assert said in str(refused.value)


def test_a_vertical_job_needs_every_party_and_aligns_with_its_plan() -> None:
    config = job_config(_job())
    assert config.quorum == 2 and config.orchestration == "parallel"
    assert not config.plan.u_shaped  # the aggregator holds the top: the label party sends labels
