from __future__ import annotations

import copy

import pytest
import torch

from medsplit.wire import Decoder, Envelope, encode
from models import assemble, builtin_plan_names, cut_shapes, load_plan, split_model
from models.split import shared_state


@pytest.mark.parametrize("plan_name", builtin_plan_names())
def test_split_then_assemble_gives_identical_outputs(plan_name: str) -> None:
    torch.manual_seed(0)
    plan = load_plan(plan_name)
    model = plan.model.build().eval()
    x = torch.randn(5, *plan.model.input_shape)
    expected = model(x)

    parts = split_model(model, plan)
    h = parts.head(x)
    h = parts.trunk(h)
    if parts.tail is not None:
        h = parts.tail(h)
    assert torch.equal(h, expected)
    assert torch.equal(assemble(parts)(x), expected)


@pytest.mark.parametrize("plan_name", builtin_plan_names())
def test_segment_weights_shipped_separately_rebuild_the_same_model(plan_name: str) -> None:
    """What split learning does: each segment's weights travel alone and are reassembled."""
    torch.manual_seed(1)
    plan = load_plan(plan_name)
    model = plan.model.build().eval()
    x = torch.randn(3, *plan.model.input_shape)
    parts = split_model(model, plan)

    fresh = copy.deepcopy(plan.model.build()).eval()
    decoder = Decoder()
    for segment in parts.segments():
        frames = encode(Envelope("job", "site-a", "weights", tensors=segment.state_dict()))
        envelope = None
        for frame in frames:
            envelope = decoder.feed(frame) or envelope
        assert envelope is not None
        fresh.load_state_dict(dict(envelope.tensors), strict=False)
    assert torch.equal(fresh(x), model(x))


def test_segment_state_keys_partition_the_model() -> None:
    plan = load_plan("resnet18-cxr")
    parts = split_model(plan.model.build(), plan)
    keys = [set(segment.state_dict()) for segment in parts.segments()]
    assert sum(len(k) for k in keys) == len(plan.model.state_keys)
    assert set().union(*keys) == set(plan.model.state_keys)


def test_cut_shapes_match_a_real_forward_pass() -> None:
    plan = load_plan("cnn-cxr-u")
    parts = split_model(plan.model.build(), plan)
    x = torch.randn(7, *plan.model.input_shape)
    head_out = parts.head(x)
    trunk_out = parts.trunk(head_out)
    assert parts.tail is not None
    assert cut_shapes(plan, 7) == {
        "head_out": tuple(head_out.shape),
        "trunk_out": tuple(trunk_out.shape),
        "logits": tuple(parts.tail(trunk_out).shape),
    }
    assert cut_shapes(plan, 32)["head_out"] == (32, 16, 32, 32)  # 2 MiB of fp32 per batch


def test_shared_state_never_contains_private_tensors() -> None:
    plan = load_plan("mlp-ehr")
    state = shared_state(plan.model.build(), plan)
    assert set(state) == plan.shared_keys
    assert not set(state) & plan.private_keys


def test_split_refuses_a_model_of_another_architecture() -> None:
    plan = load_plan("cnn-cxr-u")
    with pytest.raises(ValueError, match="do not match the plan"):
        split_model(load_plan("mlp-ehr").model.build(), plan)


def test_cut_shapes_leave_the_global_random_state_alone() -> None:
    """Sites and the aggregator seed torch before building their models; shape checks in
    between must not shift the initial weights."""
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    cut_shapes(load_plan("resnet18-cxr"), 4)
    assert torch.equal(torch.rand(3), expected)
