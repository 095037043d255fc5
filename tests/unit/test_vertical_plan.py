"""The vertical architecture, its plans and its jobs' settings: what is built, what is refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from aggregator.trunk import Trunk
from aggregator.vertical import vertical_trunk
from experiments.vertical import column_widths, party_names, table_plan
from medsplit.config import DEFAULT_LABEL_NOISE
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


@pytest.mark.parametrize("u_shaped", [True, False])
def test_gradients_back_to_a_party_without_labels_carry_noise_by_default(u_shaped: bool) -> None:
    plan = table_plan(party_names(2), column_widths(30, 2), u_shaped=u_shaped)
    assert job_config(_job(plan=plan)).defenses.gradient_noise == DEFAULT_LABEL_NOISE
    chosen = job_config(_job(plan=plan, defenses={"gradient_noise": 2.0}))
    assert chosen.defenses.gradient_noise == 2.0  # the aggregator noises them with the top


def test_the_aggregator_noises_only_the_gradients_of_parties_without_labels() -> None:
    config = job_config(_job(defenses={"gradient_noise": 1.0}))  # the top at the aggregator
    model = config.plan.model.build(seed=0)
    trunk = Trunk(
        split_model(model, config.plan).trunk, config.training.optimizer, torch.device("cpu")
    )
    service = vertical_trunk(config, trunk)
    assert service is not None
    clean = torch.ones(4, 8)
    assert torch.equal(service._returned("hospital", clean), clean)  # the label party's own
    noisy = service._returned("imaging", clean)
    assert not torch.equal(noisy, clean)
    # noise of norm about gradient_noise x the batch's mean gradient norm, per row
    assert 0.3 < float((noisy - clean).norm(dim=1).mean() / clean.norm(dim=1).mean()) < 3
    quiet = vertical_trunk(job_config(_job(defenses={"gradient_noise": 0})), trunk)
    assert quiet is not None and torch.equal(quiet._returned("imaging", clean), clean)
