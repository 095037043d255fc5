"""Vertical split learning over the in-memory transport: alignment, exactness, refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from aggregator.config import JobConfig
from aggregator.coordinator import JobFailed
from aggregator.observability import status
from edge_agent.data.vertical import PartyTable
from experiments.inprocess import JobResult, run_job
from experiments.vertical import (
    builtin_heads,
    builtin_tables,
    centralized,
    column_widths,
    joined,
    party_names,
    table_plan,
    vertical_plan,
)
from medsplit.cli import main
from medsplit.protocol import Kind, topics
from medsplit.transport import MemoryBroker
from medsplit.wire import Decoder
from medsplit.wiring import memory_connector
from tests.support.configs import job_config


def vertical_config(parties: list[str], **overrides: Any) -> JobConfig:
    plan = overrides.pop("plan", None) or table_plan(
        parties,
        column_widths(30, len(parties)),
        merge=overrides.pop("merge", "concat"),
        u_shaped=overrides.pop("u_shaped", True),
    )
    base: dict[str, Any] = {
        "job_id": "job-v",
        "plan": plan,
        "mode": "vertical",
        "rounds": 2,
        "batch_size": 16,
        "optimizer": {"name": "adam", "lr": 0.01},
        "seed": 3,
        "sites": parties,
        "round_deadline_s": 60,
        "join_deadline_s": 60,
        "defenses": {"gradient_noise": 0},  # exactness: no noise on the label party's gradient
        "dataset": "breast-cancer",
    }
    return job_config(base | overrides)


def run_vertical(
    config: JobConfig, tables: dict[str, PartyTable], broker: MemoryBroker | None = None
) -> JobResult:
    return run_job(config, tables, memory_connector(broker or MemoryBroker()), timeout=120)


def ends_like_centralized(config: JobConfig, result: JobResult, parties: list[str]) -> None:
    data = {party: agent.data for party, agent in result.agents.items()}
    expected = centralized(config, joined(data, parties))
    got = dict(result.coordinator.final_state())
    for agent in result.agents.values():
        assert agent.segments is not None
        got |= agent.segments.state()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize(
    ("count", "merge", "u_shaped"),
    [(2, "concat", True), (2, "mean", False), (3, "concat", False), (3, "sum", True)],
)
def test_vertical_training_equals_centralized_training_on_the_joined_table(
    count: int, merge: str, u_shaped: bool
) -> None:
    parties = party_names(count)
    config = vertical_config(parties, merge=merge, u_shaped=u_shaped)
    result = run_vertical(config, builtin_tables(parties, coverage=0.85, seed=1))

    assert [r.round for r in result.history] == [0, 1]
    assert result.history[-1].metrics["hospital"]["accuracy"] > 0.85
    label_party = result.agents["hospital"].party
    assert label_party is not None and label_party.rows is not None
    shown = status(result.coordinator)
    assert shown["vertical"] == {
        "parties": parties,
        "label_party": "hospital",
        "top": "label party" if u_shaped else "aggregator",
        "merge": merge,
        "common_patients": len(label_party.rows),
    }
    assert shown["sealed_segments"] is None  # no party's layers travel, sealed or not
    ends_like_centralized(config, result, parties)


@pytest.mark.parametrize("u_shaped", [True, False])
def test_images_at_one_party_and_a_table_at_another_equal_centralized_training(
    u_shaped: bool,
) -> None:
    parties = party_names(2)
    heads = builtin_heads("synthetic-cxr", parties, hidden=4, channels=[4])
    assert heads["imaging"]["name"] == "cnn"
    plan = vertical_plan(heads, u_shaped=u_shaped, hidden=4)
    config = vertical_config(parties, plan=plan, rounds=1, dataset="synthetic-cxr")
    tables = builtin_tables(parties, dataset="synthetic-cxr", coverage=0.3, seed=5)

    result = run_vertical(config, tables)

    assert result.agents["imaging"].data.x_train.shape[1:] == (1, 64, 64)
    assert result.agents["hospital"].data.x_train.shape[1:] == (4,)
    ends_like_centralized(config, result, parties)


def test_every_party_trains_and_holds_out_the_same_patients() -> None:
    parties = party_names(3)
    tables = builtin_tables(parties, coverage=0.8, seed=2)
    result = run_vertical(vertical_config(parties, rounds=1), tables)

    keys = {}
    for party, agent in result.agents.items():
        assert agent.party is not None and agent.party.rows is not None
        keys[party] = [tables[party].keys[row] for row in agent.party.rows]
    common = set.intersection(*(set(t.keys) for t in tables.values()))
    assert sorted(keys["hospital"]) == sorted(common)
    assert keys["imaging"] == keys["hospital"] == keys["registry"]  # row i: one patient
    sizes = {p: (a.data.train_samples, len(a.data.y_test)) for p, a in result.agents.items()}
    assert len(set(sizes.values())) == 1 and sum(sizes["hospital"]) == len(common)


def test_no_label_leaves_the_label_party_when_it_holds_the_top() -> None:
    parties = party_names(2)
    broker = MemoryBroker()
    run_vertical(vertical_config(parties, rounds=1), builtin_tables(parties), broker)

    decoder = Decoder(dedup_window=10**6)
    sent_up = [
        envelope
        for _, topic, payload in broker.published
        if not topics.is_presence(topic)
        and topics.parse(topic).direction == "up"
        and (envelope := decoder.feed(payload)) is not None
    ]
    activations = [e for e in sent_up if e.kind == Kind.ACTIVATIONS]
    assert activations and all(set(e.tensors) == {"h"} for e in activations)
    assert not [e for e in sent_up if e.kind == Kind.DONE and e.tensors]  # no layer leaves


def _refusal(tables: dict[str, PartyTable], parties: list[str]) -> str:
    broker = MemoryBroker()
    with pytest.raises(JobFailed) as failed:
        run_vertical(vertical_config(parties), tables, broker)
    decoder = Decoder(dedup_window=10**6)
    kinds = {
        envelope.kind
        for _, topic, payload in broker.published
        if not topics.is_presence(topic) and (envelope := decoder.feed(payload)) is not None
    }
    assert Kind.ACTIVATIONS not in kinds and Kind.TRAIN not in kinds  # before any training
    return str(failed.value)


def test_a_party_sharing_no_patient_is_refused_before_training() -> None:
    parties = party_names(2)
    tables = builtin_tables(parties)
    other = tables["imaging"]
    tables["imaging"] = dataclasses.replace(other, keys=tuple(f"x{k}" for k in other.keys))
    message = _refusal(tables, parties)
    assert "hospital could not be aligned" in message
    assert "no patient of hospital is held by imaging" in message


@pytest.mark.parametrize(
    ("keys", "said"),
    [
        (lambda keys: ("", *keys[1:]), "key column 'patient_id' is empty in 1 row(s) (rows 1)"),
        (lambda keys: (keys[1], *keys[1:]), "key column 'patient_id' repeats 1 key(s)"),
    ],
)
def test_a_party_whose_key_column_is_missing_or_repeated_is_refused(keys: Any, said: str) -> None:
    parties = party_names(2)
    tables = builtin_tables(parties)
    tables["imaging"] = dataclasses.replace(tables["imaging"], keys=keys(tables["imaging"].keys))
    message = _refusal(tables, parties)
    assert "imaging could not be aligned" in message and said in message


def test_two_label_parties_are_refused() -> None:
    parties = party_names(2)
    tables = builtin_tables(parties)
    labels = torch.zeros(len(tables["imaging"].keys), dtype=torch.int64)
    tables["imaging"] = dataclasses.replace(tables["imaging"], y=labels)
    message = _refusal(tables, parties)
    assert "imaging holds labels, but the job's label party is hospital" in message


def test_each_party_exports_its_head_and_the_label_party_a_top_that_needs_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parties = party_names(3)
    config = vertical_config(parties, rounds=1)
    result = run_job(
        config,
        builtin_tables(parties),
        memory_connector(MemoryBroker()),
        state_root=tmp_path,
        export_onnx=True,
        joint_export=True,  # every party agrees to a joint model (tested below)
    )
    assert [p for p in parties if (tmp_path / p / "top.onnx").exists()] == ["hospital"]
    data = {party: agent.data for party, agent in result.agents.items()}
    activations = {
        party: _onnx(tmp_path / party / "head.onnx", data[party].x_test) for party in parties
    }
    top = onnxruntime.InferenceSession(str(tmp_path / "hospital" / "top.onnx"))
    layout = json.loads(top.get_modelmeta().custom_metadata_map["medsplit.inputs"])
    assert [part["party"] for part in layout] == parties  # its columns, then the others'
    x = np.concatenate([data["hospital"].x_test.numpy(), *(activations[p] for p in parties[1:])], 1)
    (logits,) = top.run(None, {top.get_inputs()[0].name: x})

    model = config.plan.model.build()
    state = dict(result.coordinator.final_state())
    for agent in result.agents.values():
        assert agent.segments is not None
        state |= agent.segments.state()
    model.load_state_dict(state)
    with torch.no_grad():
        expected = model.eval()(joined(data, parties).x_test).numpy()
    assert np.abs(logits - expected).max() < 1e-4  # the parties' exports score as one model
    _joint_model_scores_like_the_parts(tmp_path, parties, data, expected)
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: imaging did not agree to a joint model") and "\n" not in error


def _joint_model_scores_like_the_parts(
    tmp_path: Path, parties: list[str], data: dict[str, Any], expected: np.ndarray
) -> None:
    """Every party agreed: ``medsplit export-joint`` makes one model of one input per party;
    with one party's agreement withdrawn it is refused, naming that party."""
    heads = [f"--head={p}={tmp_path / p / 'head.onnx'}" for p in parties[1:]]
    top = f"--top={tmp_path / 'hospital' / 'top.onnx'}"
    out = tmp_path / "joint.onnx"
    assert main(["export-joint", top, *heads, f"--out={out}"]) == 0
    joint = onnxruntime.InferenceSession(str(out))
    assert [i.name for i in joint.get_inputs()] == parties
    (logits,) = joint.run(None, {p: data[p].x_test.numpy() for p in parties})
    assert np.abs(logits - expected).max() < 1e-4

    withdrawn = onnx.load_model(str(tmp_path / "imaging" / "head.onnx"))
    for prop in withdrawn.metadata_props:
        if prop.key == "medsplit.joint":
            prop.value = "not agreed"  # as a party without joint_export: true writes it
    onnx.save_model(withdrawn, str(tmp_path / "imaging-head.onnx"))
    heads[0] = f"--head=imaging={tmp_path / 'imaging-head.onnx'}"
    assert main(["export-joint", top, *heads, f"--out={tmp_path / 'refused.onnx'}"]) == 2
    assert not (tmp_path / "refused.onnx").exists()


def _onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return np.asarray(out)
