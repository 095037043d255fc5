"""The built-in real patient tables: the horizon rule, the encoding, and a job on each."""

from __future__ import annotations

import numpy as np
import pytest
from sksurv import datasets as sksurv_datasets

from edge_agent.data import datasets
from edge_agent.data.clinical_tables import TABLES, load_table
from edge_agent.data.names import TABLE_FEATURES
from experiments.inprocess import run_job
from experiments.table_plans import dataset_plan
from medsplit.transport import MemoryBroker
from medsplit.wiring import memory_connector
from tests.support.configs import job_config


@pytest.mark.parametrize("name", list(TABLES))
def test_each_table_is_event_within_its_horizon_with_early_censoring_left_out(name: str) -> None:
    spec, table = TABLES[name], load_table(name)
    frame, outcome = getattr(sksurv_datasets, spec.loader)()
    event, time = outcome[spec.event].astype(bool), outcome[spec.time]
    positive = event & (time <= spec.horizon_days)
    censored_early = ~event & (time <= spec.horizon_days)
    assert table.excluded == int(censored_early.sum())
    assert len(table.y) == len(frame) - table.excluded
    assert int(table.y.sum()) == int(positive.sum())
    assert len(table.features) == TABLE_FEATURES[name] == table.x.shape[1]
    assert bool(np.isfinite(table.x.numpy()).all())
    assert not any(column in spec.dropped for column in table.features)


def test_a_missing_value_becomes_a_fixed_value_and_an_indicator() -> None:
    table = load_table("flchain-death")
    missing = table.x[:, table.features.index("creatinine missing")]
    creatinine = table.x[:, table.features.index("creatinine")]
    assert 0 < int(missing.sum()) < len(missing)
    assert bool((creatinine[missing == 1] == 1.0).all())
    assert "chapter" not in " ".join(table.features)  # the cause of death is the outcome


@pytest.mark.parametrize("mode", ["fedavg", "split-u"])
def test_a_job_trains_on_a_built_in_table_with_the_ehr_plan_made_as_wide(mode: str) -> None:
    names = ["site-a", "site-b"]
    shares = {
        name: datasets.share("gbsg2-recurrence", "iid", 2, i, seed=0)
        for i, name in enumerate(names)
    }
    family = "split-u" if mode == "split-u" else "federated"
    config = job_config(
        {"job_id": "t", "plan": dataset_plan("gbsg2-recurrence", family), "mode": mode,
         "rounds": 2, "sites": names, "batch_size": 32},
    )  # fmt: skip
    assert config.plan.model.input_shape == (TABLE_FEATURES["gbsg2-recurrence"],)
    result = run_job(config, shares, memory_connector(MemoryBroker()))
    pooled = result.history[-1].pooled
    assert pooled["samples"] == sum(len(s.y_test) for s in shares.values())
    assert pooled["macro_auroc"] is not None and 0.0 <= pooled["macro_auroc"] <= 1.0
