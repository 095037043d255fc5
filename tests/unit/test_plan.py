from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from models import ConfigError, SplitPlan, builtin_plan_names, load_plan


def _plan(**overrides: Any) -> dict[str, Any]:
    plan: dict[str, Any] = {"model": {"name": "cnn", "args": {"image_size": 32}}, "cut": "conv1"}
    plan.update(overrides)
    return plan


def _error(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        SplitPlan.from_mapping(data, "plan.yaml")
    return info.value


@pytest.mark.parametrize("name", builtin_plan_names())
def test_builtin_plans_load(name: str) -> None:
    plan = load_plan(name)
    assert plan.head and plan.trunk
    assert plan.shared_keys | plan.private_keys == set(plan.model.state_keys)
    assert not plan.shared_keys & plan.private_keys


def test_segments_by_name_and_by_count_agree() -> None:
    by_name = SplitPlan.from_mapping(_plan(cut="conv2", tail_cut="fc"))
    by_count = SplitPlan.from_mapping(_plan(cut=2, tail_cut=4))
    for plan in (by_name, by_count):
        assert plan.head == ("conv1", "conv2")
        assert plan.trunk == ("conv3", "fc")
        assert plan.tail == ("classifier",)
        assert plan.u_shaped


def test_vanilla_plan_has_no_tail_and_shares_everything_by_default() -> None:
    plan = SplitPlan.from_mapping(_plan())
    assert plan.tail == () and not plan.u_shaped
    assert plan.shared_keys == set(plan.model.state_keys)
    assert plan.private_keys == frozenset()


def test_private_by_block_and_shared_by_pattern() -> None:
    plan = SplitPlan.from_mapping(_plan(shared=["conv*", "fc.*"], private=["classifier"]))
    assert plan.private_keys == {"classifier.weight", "classifier.bias"}
    assert "conv3.0.weight" in plan.shared_keys


@pytest.mark.parametrize("cut", [0, 5, -1])
def test_cut_out_of_range_names_field_and_allowed_range(cut: int) -> None:
    error = _error(_plan(cut=cut))
    assert error.problems[0][0] == "cut"
    assert "1..4" in str(error) and "block name: conv1, conv2, conv3, fc" in str(error)


def test_unknown_layer_names_allowed_values() -> None:
    error = _error(_plan(cut="conv9"))
    assert error.problems == [("cut", "unknown layer 'conv9'; allowed: conv1, conv2, conv3, fc")]


def test_empty_trunk_is_refused() -> None:
    error = _error(_plan(cut="conv2", tail_cut="conv2"))
    assert error.problems[0][0] == "tail_cut"
    assert "trunk would be empty" in str(error)


def test_empty_tail_is_refused() -> None:
    # A cut after the last block would leave the tail empty.
    error = _error(_plan(tail_cut="classifier"))
    assert error.problems[0][0] == "tail_cut"


def test_parameter_both_shared_and_private_is_refused() -> None:
    error = _error(
        _plan(shared=["conv1", "conv2", "conv3", "fc", "classifier"], private=["classifier.bias"])
    )
    assert "both shared and private" in str(error) and "classifier.bias" in str(error)


def test_parameter_neither_shared_nor_private_is_refused() -> None:
    error = _error(_plan(shared=["conv1"], private=["classifier"]))
    assert "neither shared nor private" in str(error)


def test_pattern_matching_nothing_is_refused() -> None:
    error = _error(_plan(private=["head.*"]))
    assert error.problems[0][0] == "private"
    assert "'head.*' matches no layer or parameter" in str(error)


def test_unknown_field_and_unknown_architecture() -> None:
    assert _error(_plan(cutt=1)).problems[0] == ("cutt", "unknown field (check the spelling)")
    error = _error({"model": {"name": "vgg"}, "cut": 1})
    assert error.problems[0][0] == "model.name" and "allowed: cnn, mlp, monai.DenseNet121" in str(
        error
    )


def test_bad_model_arguments_name_the_argument() -> None:
    error = _error({"model": {"name": "mlp", "args": {"hiden": [3]}}, "cut": 1})
    assert error.problems[0][0] == "model.args" and "hiden" in str(error)


def test_yaml_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=r"missing\.yaml: file not found"):
        SplitPlan.from_yaml(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML"):
        SplitPlan.from_yaml(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        SplitPlan.from_yaml(listing)
    good = tmp_path / "good.yaml"
    good.write_text("model: {name: mlp}\ncut: hidden1\ntail_cut: hidden2\n")
    assert SplitPlan.from_yaml(good).tail == ("classifier",)


def test_cut_after_last_block_is_refused() -> None:
    error = _error(_plan(cut="classifier"))
    assert error.problems[0][0] == "cut" and "empty segment" in str(error)
