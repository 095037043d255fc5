"""A network from the user's own package, with a functional forward, trained in every mode (in
process, in-memory broker), and mixed precision on the CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from experiments.inprocess import JobResult, run_job
from medsplit.transport import MemoryBroker
from medsplit.wiring import memory_connector
from tests.component.test_split_learning import _config, _sites
from tests.support import own_package

SITES = ["site-a", "site-b"]


@pytest.fixture(autouse=True)
def clinic(tmp_path: Path) -> Iterator[Path]:
    with own_package.on_path(tmp_path) as root:
        yield root


def _run(mode: str, orchestration: str, precision: str = "fp32") -> JobResult:
    plan = own_package.plan()
    if mode == "split":
        plan["tail_cut"] = None
    config = _config(
        mode=mode,
        plan=plan,
        orchestration=orchestration,
        sites=SITES,
        rounds=2,
        defenses={"gradient_noise": 0},
        training={
            "batch_size": 16,
            "optimizer": {"name": "adam", "lr": 0.01},
            "precision": precision,
        },
    )
    return run_job(config, _sites(SITES), memory_connector(MemoryBroker()))


@pytest.mark.parametrize(
    ("mode", "orchestration"),
    [
        ("split", "sequential"),
        ("split-u", "sequential"),
        ("split-u", "parallel"),
        ("fedavg", "parallel"),
        ("flop", "parallel"),
    ],
)
def test_every_mode_trains_a_network_of_the_user_s_own(mode: str, orchestration: str) -> None:
    result = _run(mode, orchestration)
    last = result.history[-1]
    assert sorted(last.trained) == SITES
    assert all(m["accuracy"] > 0.8 for m in last.metrics.values())  # a coin flip: ~0.5


def _final(result: JobResult) -> dict[str, torch.Tensor]:
    return result.final_model("site-a")


def test_bf16_autocast_trains_reproducibly_and_is_really_bf16() -> None:
    bf16 = _run("split-u", "sequential", "bf16")
    again = _run("split-u", "sequential", "bf16")
    fp32 = _run("split-u", "sequential")
    a, b, c = _final(bf16), _final(again), _final(fp32)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same seed, the same bf16 job
    assert any(not torch.equal(a[k], c[k]) for k in a)  # autocast changed the arithmetic
    assert all(a[k].dtype == torch.float32 for k in a)  # weights stay float32
    assert all(m["accuracy"] > 0.85 for m in bf16.history[-1].metrics.values())


@pytest.mark.parametrize(
    ("mode", "orchestration"), [("split-u", "parallel"), ("fedavg", "parallel")]
)
def test_fp16_with_gradient_scalers_learns_what_fp32_learns(mode: str, orchestration: str) -> None:
    fp16 = _run(mode, orchestration, "fp16")
    fp32 = _run(mode, orchestration)
    for site in SITES:
        half, full = fp16.history[-1].train_loss[site], fp32.history[-1].train_loss[site]
        assert half == pytest.approx(full, rel=0.02)  # no step lost to an overflow
    a, b = _final(fp16), _final(fp32)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # it really ran in half precision
