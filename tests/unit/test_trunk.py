"""The aggregator's trunk: parallel rounds that do not depend on message order, turns that can
be put back, and state no sender can grow."""

from __future__ import annotations

import torch
from torch import nn

from aggregator.trunk import Trunk
from medsplit.config import OptimizerConfig


def _trunk(parallel: bool) -> Trunk:
    torch.manual_seed(0)
    return Trunk(
        nn.Sequential(nn.Linear(4, 3)),
        OptimizerConfig(lr=0.05),
        torch.device("cpu"),
        parallel=parallel,
    )


def _inputs(site: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(ord(site[0]) * 100 + step)
    return torch.randn(5, 4, generator=generator), torch.randn(5, 3, generator=generator)


def _step(trunk: Trunk, site: str, step: int) -> None:
    h, g = _inputs(site, step)
    trunk.forward(site, 0, step, h)
    assert trunk.backward(site, 0, step, g) is not None


def _state(trunk: Trunk) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trunk.module.state_dict().items()}


def test_a_parallel_round_gives_the_same_trunk_whatever_order_the_steps_arrive_in() -> None:
    outcomes = []
    for order in (["a", "b", "a", "b"], ["a", "a", "b", "b"], ["b", "b", "a", "a"]):
        trunk = _trunk(parallel=True)
        trunk.open_turn(("a", "b"))
        steps = {"a": 0, "b": 0}
        for site in order:
            _step(trunk, site, steps[site])
            steps[site] += 1
        trunk.close_turn({"a": 30, "b": 10})
        outcomes.append(_state(trunk))
    first = outcomes[0]
    assert all(torch.equal(first[k], other[k]) for other in outcomes[1:] for k in first)
    assert not torch.equal(
        first["0.weight"], _state(_trunk(parallel=True))["0.weight"]
    )  # it trained


def test_forgetting_a_site_puts_its_share_of_the_trunk_back_where_the_turn_began() -> None:
    for parallel in (False, True):
        trunk = _trunk(parallel)
        trunk.open_turn(("a",))
        _step(trunk, "a", 0)
        trunk.close_turn({"a": 5})
        before = _state(trunk)
        trunk.open_turn(("a",))
        _step(trunk, "a", 0)
        _step(trunk, "a", 1)
        trunk.forget("a")  # the site restarted mid-turn
        for step in (0, 1):  # and redoes the turn from the same start
            _step(trunk, "a", step)
        trunk.close_turn({"a": 5})
        redone = _state(trunk)

        reference = _trunk(parallel)
        reference.open_turn(("a",))
        _step(reference, "a", 0)
        reference.close_turn({"a": 5})
        assert all(torch.equal(before[k], _state(reference)[k]) for k in before)
        reference.open_turn(("a",))
        for step in (0, 1):
            _step(reference, "a", step)
        reference.close_turn({"a": 5})
        expected = _state(reference)
        assert all(torch.equal(redone[k], expected[k]) for k in expected), parallel


def test_at_most_one_open_step_per_site_and_no_backward_for_another() -> None:
    trunk = _trunk(parallel=False)
    trunk.open_turn(("a",))
    for step in range(50):
        trunk.forward("a", 0, step, torch.randn(5, 4))
    assert trunk.open_steps == 1
    assert trunk.backward("a", 0, 3, torch.randn(5, 3)) is None  # not the open one
    assert trunk.backward("a", 0, 49, torch.randn(5, 3)) is not None
    assert trunk.open_steps == 0


def _fp16_trunk() -> Trunk:
    return Trunk(
        nn.Sequential(nn.Linear(4, 3)),
        OptimizerConfig(lr=0.05),
        torch.device("cpu"),
        parallel=True,
        precision="fp16",
    )


def test_fp16_loss_scales_travel_in_the_trunk_s_checkpoint() -> None:
    """A resumed fp16 job goes on with the scale each copy had, not a fresh 65536."""
    trunk = _fp16_trunk()
    for step in range(3):
        _step(trunk, "a", step)
    huge = torch.full((5, 3), 1e30)  # overflows in fp16: the scale backs off
    trunk.forward("a", 0, 3, _inputs("a", 3)[0])
    trunk.backward("a", 0, 3, huge)
    scale = trunk._precision("a").scale
    assert scale < 65536.0
    tensors, document = trunk.state()
    resumed = _fp16_trunk()
    resumed.load_state(tensors, document)
    assert resumed._precision("a").scale == scale


def test_a_pipelined_step_steps_once_after_its_last_micro_batch_like_the_whole_batch() -> None:
    """Micro-batches' gradients accumulate (the site weighs each by its share of the loss,
    here the gradient it returns): one update, the whole batch's up to summation order."""
    h, g = _inputs("a", 0)
    whole = _trunk(parallel=False)
    whole.forward("a", 0, 0, h)
    expected_head_grad = whole.backward("a", 0, 0, g)

    pipelined = _trunk(parallel=False)
    start = _state(pipelined)
    parts = (slice(0, 3), slice(3, 5))
    for micro, part in enumerate(parts):  # every forward first, as a pipelined site sends them
        pipelined.forward("a", 0, 0, h[part], micro, len(parts))
    assert pipelined.open_steps == 2
    head_grads = []
    for micro, part in enumerate(parts):
        assert all(torch.equal(start[k], _state(pipelined)[k]) for k in start)  # not yet
        head_grads.append(pipelined.backward("a", 0, 0, g[part], micro))
    assert pipelined.open_steps == 0
    after, expected = _state(pipelined), _state(whole)
    for key in expected:
        torch.testing.assert_close(after[key], expected[key], rtol=0, atol=1e-6)
    assert expected_head_grad is not None
    torch.testing.assert_close(torch.cat(head_grads), expected_head_grad, rtol=0, atol=1e-6)


def test_a_pipelined_step_holds_at_most_its_micro_batches_and_a_new_step_drops_the_old() -> None:
    trunk = _trunk(parallel=False)
    trunk.open_turn(("a",))
    for micro in range(4):
        trunk.forward("a", 0, 7, torch.randn(2, 4), micro, 4)
    assert trunk.open_steps == 4
    trunk.forward("a", 0, 7, torch.randn(2, 4), 2, 4)  # the same micro-batch again: started over
    assert trunk.open_steps == 1
    trunk.forward("a", 0, 8, torch.randn(2, 4), 0, 4)  # the site gave step 7 up
    assert trunk.open_steps == 1
    assert trunk.backward("a", 0, 7, torch.randn(2, 3), 2) is None  # of the dropped step
    assert trunk.backward("a", 0, 8, torch.randn(2, 3), 1) is None  # never sent forward
    assert trunk.backward("a", 0, 8, torch.randn(2, 3), 0) is not None
    trunk.forget("a")
    assert trunk.open_steps == 0


def test_vanilla_split_micro_batches_weighed_by_their_share_make_the_batch_s_update() -> None:
    torch.manual_seed(1)
    h, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    whole = _trunk(parallel=False)
    whole_grad, whole_loss = whole.split_step("a", 0, 0, h, y)
    pipelined = _trunk(parallel=False)
    grads, loss = [], 0.0
    for micro, part in enumerate((slice(0, 2), slice(2, 6))):
        share = (part.stop - part.start) / 6
        grad, micro_loss = pipelined.split_step("a", 0, 0, h[part], y[part], micro, 2, share)
        grads.append(grad)
        loss += share * micro_loss
    assert abs(loss - whole_loss) < 1e-6
    torch.testing.assert_close(torch.cat(grads), whole_grad, rtol=0, atol=1e-7)
    after, expected = _state(pipelined), _state(whole)
    for key in expected:
        torch.testing.assert_close(after[key], expected[key], rtol=0, atol=1e-6)
