"""Pipelined split steps' pieces: how a batch is cut, each piece's share of the loss, and the
header that says where a message stands in its step."""

from __future__ import annotations

import pytest
import torch

from medsplit.protocol.kinds import Kind
from medsplit.protocol.meta import SCHEMAS, StepMeta, read_meta
from medsplit.training import loss_fn, loss_shares, micro_batches
from medsplit.wire import Envelope
from medsplit.wire.errors import BadMeta


@pytest.mark.parametrize(("samples", "count"), [(32, 4), (33, 4), (3, 4), (1, 1), (7, 64)])
def test_micro_batches_cover_the_batch_in_order_none_empty_near_equal(
    samples: int, count: int
) -> None:
    parts = micro_batches(samples, count)
    assert len(parts) == min(samples, count)
    covered = [i for part in parts for i in range(part.start, part.stop)]
    assert covered == list(range(samples))
    sizes = [part.stop - part.start for part in parts]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("weighted", [False, True])
def test_shares_weigh_micro_batch_losses_into_the_batch_loss(weighted: bool) -> None:
    """Class-weighted cross-entropy is a weighted mean: a micro-batch's share is its weight's,
    not its rows'; either way the shares add the micro-batches' losses up to the batch's."""
    torch.manual_seed(0)
    logits, labels = torch.randn(10, 3), torch.tensor([0, 0, 0, 0, 1, 1, 2, 0, 0, 1])
    weights = torch.tensor([0.5, 2.0, 4.0]) if weighted else None
    parts = micro_batches(10, 3)
    shares = loss_shares(labels, parts, weights)
    assert sum(shares) == pytest.approx(1.0)
    combined = sum(
        share * loss_fn(logits[part], labels[part], weights)
        for share, part in zip(shares, parts, strict=True)
    )
    assert float(combined) == pytest.approx(float(loss_fn(logits, labels, weights)), abs=1e-6)


def _place(kind: str, meta: dict[str, object]) -> StepMeta:
    schema = SCHEMAS[kind]
    assert schema is StepMeta
    return read_meta(schema, Envelope("job-j", "site-a", kind, round=0, step=3, meta=meta))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("meta", "problem"),
    [
        ({"micro": 2, "micros": 2}, "micro 2 of a step of 2"),
        ({"micro": 0, "micros": 65}, "micros"),
        ({"micro": 0, "micros": 2, "share": 0.0}, "share"),
        ({"micro": "0"}, "micro"),
    ],
)
def test_a_step_header_out_of_its_step_is_refused_naming_the_field(
    meta: dict[str, object], problem: str
) -> None:
    with pytest.raises(BadMeta, match=problem):
        _place(Kind.ACTIVATIONS, meta)


def test_an_unpipelined_step_needs_no_header_and_a_pipelined_one_says_its_place() -> None:
    assert _place(Kind.TRUNK_GRAD, {}) == StepMeta()
    place = _place(Kind.ACTIVATIONS, {"micro": 1, "micros": 4, "share": 0.25})
    assert place == StepMeta(micro=1, micros=4, share=0.25)
