"""What bounds a hostile peer: robust aggregation, per-sender bounds, fair queues, throttles."""

from __future__ import annotations

import math

import pytest
import torch

from aggregator.strategy import FedAvg, Reply
from medsplit.aggregation import Aggregation, clip_update, coordinate_wise, update_norm
from medsplit.throttle import Throttle
from medsplit.transport.inbox import ByteBoundedQueue, branch
from medsplit.wire import (
    ChecksumMismatch,
    Decoder,
    Envelope,
    ReassemblyOverflow,
    WireLimits,
    encode,
)

SMALL = WireLimits(max_frame_bytes=4096)


def _env(**tensors: torch.Tensor) -> Envelope:
    return Envelope("job", "a", "done", round=0, tensors=dict(tensors))


def test_median_and_trimmed_mean_ignore_one_outlier() -> None:
    states = [
        {"w": torch.tensor([v, -v]), "n": torch.tensor(i)}
        for i, v in enumerate([1.0, 2, 3, 4, 1000])
    ]
    median = coordinate_wise(states, trim=None)
    assert median["w"].tolist() == [3.0, -3.0] and median["n"].item() == 4
    trimmed = coordinate_wise(states, trim=0.2)  # one cut at each end of five
    assert trimmed["w"].tolist() == [3.0, -3.0]
    even = coordinate_wise(states[:4], trim=None)
    assert even["w"].tolist() == [2.5, -2.5]  # the mean of the two middle values


def test_clipping_bounds_the_update_norm_and_keeps_small_ones() -> None:
    current = {"w": torch.zeros(4), "n": torch.tensor(3)}
    big = {"w": torch.full((4,), 10.0), "n": torch.tensor(9)}
    clipped = clip_update(current, big, max_norm=2.0)
    assert math.isclose(float(clipped["w"].norm()), 2.0, rel_tol=1e-6)
    assert clipped["n"].item() == 9
    small = {"w": torch.full((4,), 0.1), "n": torch.tensor(3)}
    assert torch.equal(clip_update(current, small, max_norm=2.0)["w"], small["w"])


def test_robust_fedavg_is_not_moved_by_one_poisoned_reply() -> None:
    current = {"w": torch.zeros(3)}
    honest = [Reply(f"s{i}", {"w": torch.full((3,), 1.0 + i / 10)}, 10) for i in range(4)]
    poisoned = Reply("evil", {"w": torch.full((3,), -1e6)}, 10)
    plain = FedAvg(aggregation=Aggregation("mean", median_norm_clip=None)).aggregate_train(
        current, [*honest, poisoned]
    )
    robust = FedAvg(aggregation=Aggregation("trimmed-mean", median_norm_clip=None)).aggregate_train(
        current, [*honest, poisoned]
    )
    assert plain["w"][0] < -1e5
    # Sorted, each coordinate is [-1e6, 1.0, 1.1, 1.2, 1.3]: one cut at each end leaves 1.0-1.2.
    assert torch.allclose(robust["w"], torch.full((3,), 1.1))
    with pytest.raises(ValueError, match="unknown aggregation"):
        FedAvg(aggregation=Aggregation("mode")).aggregate_train(current, honest)


def test_every_update_is_clipped_to_the_rounds_median_norm_first() -> None:
    current = {"w": torch.zeros(4), "n": torch.tensor(1)}
    norms = [1.0, 2.0, 3.0, 4000.0]  # the last site scaled its update a thousandfold
    replies = [
        Reply(f"s{i}", {"w": torch.full((4,), norm / 2), "n": torch.tensor(i)}, 10)
        for i, norm in enumerate(norms)
    ]
    median = 2.5  # of the four update norms
    clipped_mean = FedAvg(aggregation=Aggregation("mean"))
    combined = clipped_mean.aggregate_train(current, replies)
    # 1 and 2 pass untouched, 3 and 4000 are scaled down to 2.5: the mean of the norms.
    assert math.isclose(float(combined["w"].norm()), (1 + 2 + median + median) / 4, rel_tol=1e-6)
    assert combined["n"].item() == 3  # counters are not clipped
    negated = Reply("evil", {"w": torch.full((4,), -1e6), "n": torch.tensor(0)}, 10)
    pulled = clipped_mean.aggregate_train(current, [*replies[:3], negated])
    # Clipped to the median norm, the hostile update pulls back no harder than a typical one.
    assert float(pulled["w"].sum()) > 0
    assert math.isclose(update_norm(current, dict(negated.state)), 2e6, rel_tol=1e-9)


def test_by_default_a_negated_update_is_outvoted_not_averaged_in() -> None:
    current = {"w": torch.zeros(4)}
    honest = [Reply(f"s{i}", {"w": torch.full((4,), 1.0 + i / 10)}, 10) for i in range(2)]
    negated = Reply("evil", {"w": torch.full((4,), -1.05)}, 1000)  # weighty, typical norm
    robust = FedAvg().aggregate_train(current, [*honest, negated])
    # The three updates lie on one line: 1.0, 1.1 (clipped to the median norm, 1.05) and
    # -1.05 per coordinate. Their geometric median is the middle one, the lower honest value,
    # whatever the hostile site's sample count; the weighted mean follows the hostile site.
    assert torch.allclose(robust["w"], torch.full((4,), 1.0), atol=1e-5)
    weighted = FedAvg(aggregation=Aggregation("mean")).aggregate_train(current, [*honest, negated])
    assert float(weighted["w"].sum()) < 0


def test_the_geometric_median_follows_the_agreeing_sites_not_the_far_one() -> None:
    current = {"w": torch.zeros(2), "n": torch.tensor(0)}
    replies = [
        Reply("a", {"w": torch.tensor([1.0, 0.0]), "n": torch.tensor(1)}, 10),
        Reply("b", {"w": torch.tensor([1.2, 0.0]), "n": torch.tensor(2)}, 10),
        Reply("evil", {"w": torch.tensor([-1e6, 1e6]), "n": torch.tensor(0)}, 10),
    ]
    plain = Aggregation("geometric-median", median_norm_clip=None)
    combined = FedAvg(aggregation=plain).aggregate_train(current, replies)
    # The point nearest to all three is on the segment of the two that agree.
    assert 0.99 < float(combined["w"][0]) < 1.21 and abs(float(combined["w"][1])) < 1e-3
    assert combined["n"].item() == 2

    def with_evil_at(distance: float) -> torch.Tensor:
        far = Reply("evil", {"w": torch.tensor([-distance, distance])}, 10**6)
        trio = [Reply(r.site, {"w": r.state["w"]}, r.samples) for r in replies[:2]] + [far]
        return FedAvg(aggregation=plain).aggregate_train({"w": torch.zeros(2)}, trio)["w"]

    # A far point pulls with its count, not its distance (nor its claimed sample count).
    assert torch.allclose(with_evil_at(1e3), with_evil_at(1e6), atol=1e-4)


def test_a_truncated_copy_does_not_shadow_the_genuine_message() -> None:
    (frame,) = encode(_env(x=torch.randn(8)))
    decoder = Decoder()
    with pytest.raises(ChecksumMismatch):
        decoder.feed(frame[:-4])
    envelope = decoder.feed(frame)
    assert envelope is not None and envelope.tensors["x"].shape == (8,)
    assert decoder.feed(frame) is None and decoder.duplicates == 1


def test_one_sender_cannot_hold_every_reassembly_slot() -> None:
    decoder = Decoder(SMALL, max_pending_per_sender=3)
    firsts = [encode(_env(x=torch.randn(4096)), limits=SMALL)[0] for _ in range(4)]
    for frame in firsts[:3]:
        assert decoder.feed(frame, "evil") is None
    with pytest.raises(ReassemblyOverflow, match="evil already has 3 incomplete messages"):
        decoder.feed(firsts[3], "evil")
    honest = encode(_env(x=torch.randn(4096)), limits=SMALL)
    results = [decoder.feed(frame, "honest") for frame in honest]
    assert results[-1] is not None  # another sender's message still completes


def test_the_inbox_serves_senders_in_turn_and_throttles_a_flood() -> None:
    queue: ByteBoundedQueue[str] = ByteBoundedQueue(max_bytes=400)  # a share: 100 bytes
    evil, good = branch("medsplit/v1/j/evil/up/junk"), branch("medsplit/v1/j/good/up/done")
    assert queue.put("done", 20, good)
    for i in range(19):
        assert queue.put(f"flood-{i}", 20, evil)
    # Full: the flooding branch holds more than its share while another waits, so its next
    # message is dropped, not left to block the network thread.
    assert not queue.put("flood-19", 20, evil)
    assert queue.throttled == {"medsplit/v1/j/evil/up": 1}
    assert [queue.get(0) for _ in range(2)] == ["done", "flood-0"]
    assert queue.put("done-2", 20, good)
    assert [queue.get(0) for _ in range(3)] == ["flood-1", "done-2", "flood-2"]
    assert len(queue) == 16


def test_the_throttle_allows_a_burst_per_interval_and_counts_the_rest() -> None:
    now = [0.0]
    throttle = Throttle(burst=2, interval_s=10.0, clock=lambda: now[0])
    assert [throttle.allow("a") for _ in range(5)] == [True, True, False, False, False]
    assert throttle.allow("b")  # per key
    now[0] = 10.0
    assert throttle.allow("a") and throttle.take_suppressed("a") == 3
    assert throttle.take_suppressed("a") == 0
