"""Checkpoints and snapshots: what is written reads back exactly; what is damaged is refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save
from torch import nn

from aggregator.checkpoint import CheckpointMismatch, CheckpointStore
from aggregator.config import JobConfig
from aggregator.state import ResumePoint, RoundRecord, SiteEntry
from aggregator.trunk import Trunk
from medsplit.config import OptimizerConfig
from medsplit.snapshots import SnapshotError, decode, encode
from tests.support.configs import job_config


def _config(**overrides: object) -> JobConfig:
    return job_config({"job_id": "job-ckpt", "plan": "mlp-ehr-u", "sites": ["a", "b"], **overrides})


def _point(round: int = 2) -> ResumePoint:
    record = RoundRecord(
        0,
        metrics={"a": {"accuracy": 0.9, "loss": 0.2, "samples": 5}},
        train_loss={"a": 0.31},
        missed=["b"],
        trained=["a"],
        bytes={"a": {"up": 10, "down": 20}},
        seconds=1.5,
        resumed=True,
        pooled={"samples": 5.0, "balanced_accuracy": 0.85, "macro_auroc": None},
    )
    return ResumePoint(
        round=round,
        weights={"head.0.weight": torch.randn(4, 3), "head.0.bias": torch.randn(4)},
        history=(record,) * round,
        normalization=(torch.randn(30), torch.rand(30) + 0.5),
        class_weights=torch.tensor([0.7, 1.9]),
        sites={
            "a": SiteEntry(
                "a", joined=True, incarnation="i2", past_incarnations=("i1",), bytes_up=7
            ),
            "b": SiteEntry("b", finished=True),
        },
        late_messages=3,
        resumed_at=(1,),
    )


def _trained_trunk(parallel: bool) -> Trunk:
    trunk = Trunk(
        nn.Sequential(nn.Linear(4, 3)), OptimizerConfig(), torch.device("cpu"), parallel=parallel
    )
    trunk.open_turn(("a", "b"))
    for site in ("a", "b"):
        out = trunk.forward(site, 0, 0, torch.randn(2, 4))
        trunk.backward(site, 0, 0, torch.ones_like(out))
    trunk.close_turn({"a": 2, "b": 1})
    return trunk


@pytest.mark.parametrize("parallel", [False, True])
def test_a_checkpoint_reads_back_exactly(tmp_path: Path, parallel: bool) -> None:
    config = _config()
    store = CheckpointStore(tmp_path)
    trunk = _trained_trunk(parallel)
    point = _point()
    store.save(point, config, trunk.state())
    loaded = store.newest(config)
    assert loaded is not None and loaded.path.name == "round-00002.safetensors"
    back = loaded.point
    assert back.round == 2 and back.late_messages == 3 and back.resumed_at == (1,)
    assert back.history == point.history
    assert back.sites == point.sites
    assert all(torch.equal(back.weights[k], point.weights[k]) for k in point.weights)
    assert back.normalization is not None and point.normalization is not None
    assert all(
        torch.equal(x, y) for x, y in zip(back.normalization, point.normalization, strict=True)
    )
    assert back.class_weights is not None and point.class_weights is not None
    assert torch.equal(back.class_weights, point.class_weights)
    again = Trunk(
        nn.Sequential(nn.Linear(4, 3)), OptimizerConfig(), torch.device("cpu"), parallel=parallel
    )
    again.load_state(loaded.trunk_tensors, loaded.trunk_document)
    tensors, _ = trunk.state()
    restored, _ = again.state()
    assert tensors.keys() == restored.keys() and len(tensors) > 2  # weights and optimizer moments
    assert all(torch.equal(tensors[k], restored[k]) for k in tensors)


def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config()
    store = CheckpointStore(tmp_path)
    store.save(_point(1), config, None)
    newest = store.save(_point(2), config, None)
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in a tensor: safetensors alone would not notice
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        loaded = store.newest(config)
    assert loaded is not None and loaded.point.round == 1
    assert f"skipping checkpoint {newest}: " in caplog.text and "checksum mismatch" in caplog.text
    newest.write_bytes(newest.read_bytes()[:100])  # torn
    assert store.newest(config).point.round == 1  # type: ignore[union-attr]


def test_only_the_newest_checkpoints_are_kept(tmp_path: Path) -> None:
    config = _config()
    store = CheckpointStore(tmp_path, keep=2)
    for round in range(1, 5):
        store.save(_point(round), config, None)
    assert [p.name for p in store.paths()] == ["round-00004.safetensors", "round-00003.safetensors"]
    assert not list(tmp_path.glob("*.tmp"))


def test_another_jobs_checkpoint_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_point(), _config(), None)
    with pytest.raises(CheckpointMismatch, match="start with --fresh"):
        store.newest(_config(seed=1))
    assert CheckpointStore(tmp_path / "empty").newest(_config()) is None


def test_snapshots_never_accept_what_they_did_not_write() -> None:
    data = encode({"x": torch.arange(4.0)}, {"round": 3})
    tensors, document = decode(data, "x.safetensors")
    assert document == {"round": 3} and torch.equal(tensors["x"], torch.arange(4.0))
    with pytest.raises(SnapshotError, match=r"x\.safetensors: not a readable safetensors file"):
        decode(b"\x00" * 16, "x.safetensors")
    with pytest.raises(SnapshotError, match="format None"):
        decode(save({"x": torch.zeros(1)}), "x.safetensors")  # plain safetensors, not ours
