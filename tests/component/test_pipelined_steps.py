"""Pipelined split steps (``training.micro_batches``) train the model an unpipelined job
trains, in every split mode and orchestration, with the micro-batches really in flight at once.

Tolerance: a pipelined step sums its micro-batches' gradients where an unpipelined one sums
the whole batch's in one kernel, so the two differ in float summation order only: a few ulps
per step, which Adam's normalised updates carry along. Over these jobs (three rounds of about
30 steps) the weights stay within 1e-5 of each other; ``TOLERANCE`` leaves ten times that, and
the test also checks it is tight enough to see a real mistake: updating after every
micro-batch (what a missing accumulation would do) lands a thousand times further away.
"""

from __future__ import annotations

import pytest
import torch

from aggregator.config import JobConfig
from edge_agent.data import datasets
from experiments.inprocess import run_job
from medsplit.protocol import Kind, topics
from medsplit.transport import MemoryBroker
from medsplit.wire import Decoder
from medsplit.wiring import memory_connector
from tests.support.configs import job_config

TOLERANCE = 1e-4
SITES = ["site-a", "site-b"]
MICRO_BATCHES = 4
JOB = "job-p"


def _config(
    mode: str,
    orchestration: str,
    *,
    micro_batches: int,
    batch_size: int,
    sealed: bool = False,
    nopeek_alpha: float = 0.0,
    wire_dtype: str = "float32",
) -> JobConfig:
    return job_config(
        {
            "job_id": JOB,
            "plan": "mlp-ehr-u" if mode == "split-u" else "mlp-ehr",
            "mode": mode,
            "orchestration": orchestration,
            "rounds": 3,
            "seed": 3,
            "sites": SITES,
            "seal_segments": sealed,
            "dataset": "breast-cancer",
            "round_deadline_s": 60,
            "join_deadline_s": 60,
            # Exactness: no secret noise on gradients.
            "defenses": {"gradient_noise": 0, "nopeek_alpha": nopeek_alpha},
            "training": {
                "batch_size": batch_size,
                "micro_batches": micro_batches,
                "wire_dtype": wire_dtype,
                "optimizer": {"name": "adam", "lr": 0.01},
            },
        }
    )


def _trained(config: JobConfig) -> tuple[dict[str, torch.Tensor], MemoryBroker]:
    data = datasets.all_sites(datasets.load("breast-cancer"), len(SITES), "iid", seed=0)
    broker = MemoryBroker()
    result = run_job(config, dict(zip(SITES, data, strict=True)), memory_connector(broker))
    assert len(result.history) == 3
    return result.final_model(), broker


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _site_step_messages(broker: MemoryBroker, site: str) -> list[tuple[int, int, str, int]]:
    """(round, step, kind, micro) of every training cut-layer message ``site`` published."""
    decoder = Decoder(dedup_window=10**6)
    sent = []
    for _, topic, payload in broker.published:
        if not topic.startswith(topics.up(JOB, site, Kind.ACTIVATIONS).rpartition("/")[0]):
            continue
        env = decoder.feed(payload)
        if env is not None and env.kind in (Kind.ACTIVATIONS, Kind.TRUNK_GRAD):
            sent.append((env.round, env.step, env.kind, int(env.meta.get("micro") or 0)))
    return sent


@pytest.mark.parametrize("orchestration", ["sequential", "parallel"])
@pytest.mark.parametrize("mode", ["split", "split-u"])
def test_a_pipelined_job_ends_within_float_tolerance_of_the_unpipelined_one(
    mode: str, orchestration: str
) -> None:
    unpipelined, _ = _trained(_config(mode, orchestration, micro_batches=1, batch_size=16))
    pipelined, broker = _trained(
        _config(mode, orchestration, micro_batches=MICRO_BATCHES, batch_size=16)
    )
    assert _distance(pipelined, unpipelined) <= TOLERANCE
    # What updating after every micro-batch would have trained: the tolerance tells it apart.
    per_micro_batch, _ = _trained(_config(mode, orchestration, micro_batches=1, batch_size=4))
    assert _distance(per_micro_batch, unpipelined) > 1000 * _distance(pipelined, unpipelined)

    # The micro-batches were in flight together: a step's activations all went up before the
    # site could send any gradient back (it needs the trunk's answer to the first for that).
    sent = _site_step_messages(broker, "site-a")
    first_step = [(kind, micro) for r, s, kind, micro in sent if (r, s) == (0, 0)]
    activations = [(Kind.ACTIVATIONS, m) for m in range(MICRO_BATCHES)]
    assert first_step[:MICRO_BATCHES] == activations
    if mode == "split-u":
        assert first_step[MICRO_BATCHES:] == [(Kind.TRUNK_GRAD, m) for m in range(MICRO_BATCHES)]
    else:
        assert first_step == activations  # vanilla split: the trunk's gradient ends the step


def test_micro_batches_are_refused_in_a_federated_job_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"training\.micro_batches"):
        job_config(
            {
                "job_id": "job-p",
                "plan": "mlp-ehr",
                "mode": "fedavg",
                "sites": SITES,
                "dataset": "breast-cancer",
                "training": {"micro_batches": 2},
            }
        )


@pytest.mark.parametrize("wire_dtype", ["float16", "int8"])
def test_pipelining_keeps_sealed_segments_nopeek_and_the_narrow_wires(wire_dtype: str) -> None:
    """What a deployed job turns on: the sites' layers sealed, NoPeek (whose penalty stays the
    whole batch's), activations and gradients cast per row -- so cutting the batch changes no
    value on the wire, and the tolerance holds as in fp32."""
    runs = [
        _trained(
            _config(
                "split-u",
                "parallel",
                micro_batches=micro_batches,
                batch_size=16,
                sealed=True,
                nopeek_alpha=0.5,
                wire_dtype=wire_dtype,
            )
        )[0]
        for micro_batches in (1, MICRO_BATCHES)
    ]
    assert _distance(runs[0], runs[1]) <= TOLERANCE
