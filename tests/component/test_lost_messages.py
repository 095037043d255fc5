"""Messages lost on the way (what a broker restart does): every one is recovered by a repeat,
none is applied twice, and the job ends exactly as it would have without the loss.

The in-memory broker loses the first message of one kind; the same job without loss, in the
same test, is the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from experiments.inprocess import JobResult, run_job
from medsplit.protocol import topics
from medsplit.transport import MemoryBroker
from medsplit.wire import unpack_frame
from medsplit.wiring import memory_connector
from tests.component.test_split_learning import _config, _sites

RETRY_S = 0.2


def _run(mode: str, plan: str, lose: Callable[[str, bytes], bool] | None) -> JobResult:
    config = _config(
        mode=mode,
        plan=plan,
        rounds=2,
        sites=["site-a", "site-b"],
        orchestration="parallel",
        waits={"retry_interval_s": RETRY_S},
        # Two runs compared bit for bit: no secret noise (split-u's default label protection).
        defenses={"gradient_noise": 0},
    )
    broker = MemoryBroker()
    broker.lose = lose
    return run_job(
        config, _sites(["site-a", "site-b"]), memory_connector(broker), retry_interval_s=RETRY_S
    )


def _first(direction: str, kind: str) -> Callable[[str, bytes], bool]:
    """Loses the first message of ``kind`` to or from site-a, all its frames, once: the same
    message published again (a repeat, same id) gets through."""
    victim: list[str] = []
    gone: set[int] = set()  # chunks of the victim already lost
    wanted = (topics.up if direction == "up" else topics.down)("job-t", "site-a", kind)

    def lose(topic: str, payload: bytes) -> bool:
        if topic != wanted:
            return False
        header = unpack_frame(payload).header
        if not victim:
            victim.append(header.msg_id)
        if header.msg_id != victim[0] or header.chunk in gone:
            return False
        gone.add(header.chunk)
        return True

    return lose


@pytest.mark.parametrize(
    ("mode", "plan", "direction", "kind"),
    [
        ("split-u", "mlp-ehr-u", "down", "normalization"),  # the site must not train on raw inputs
        ("split-u", "mlp-ehr-u", "down", "train"),
        ("split-u", "mlp-ehr-u", "up", "activations"),  # a step's request
        ("split-u", "mlp-ehr-u", "down", "trunk-out"),  # a step's answer: repeated, not redone
        ("split-u", "mlp-ehr-u", "up", "trunk-grad"),
        ("flop", "mlp-ehr", "up", "done"),  # a round's answer: the site sends it again
        ("flop", "mlp-ehr", "up", "metrics"),
    ],
)
def test_a_lost_message_is_recovered_and_the_job_ends_exactly_as_without_the_loss(
    mode: str, plan: str, direction: str, kind: str
) -> None:
    reference = _run(mode, plan, None)
    lossy = _run(mode, plan, _first(direction, kind))
    final, expected = lossy.final_model(), reference.final_model()
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)
    for site in ("site-a", "site-b"):
        mine = lossy.agents[site].segments
        theirs = reference.agents[site].segments
        assert mine is not None and theirs is not None
        a, b = mine.full_state(), theirs.full_state()
        assert all(torch.equal(a[k], b[k]) for k in a)  # private layers too
    assert [r.missed for r in lossy.history] == [[], []]
    resent = lossy.coordinator.resent + sum(a.resent for a in lossy.agents.values())
    repeated: Any = lossy.coordinator.endpoint.stats.answers_repeated + sum(
        a.endpoint.stats.answers_repeated for a in lossy.agents.values()
    )
    assert resent >= 1  # somebody noticed and asked again
    if kind in ("trunk-out", "done", "metrics"):
        assert repeated >= 1  # the answer was sent again, the request not handled twice
