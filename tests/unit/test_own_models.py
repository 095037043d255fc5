"""Networks the user brings: the catalogue, factories cut by module name, weights files, and
which code a site agrees to import."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from medsplit.protocol import JobSpec
from models import SplitPlan, assemble, cut_shapes, split_model
from models.config_errors import ConfigError, validate
from models.factory import FactoryError
from models.plan_check import PlanCheckError, check_plan, check_recomposition
from tests.support import own_package

# Small inputs keep the catalogue quick on two CPU cores; the cuts are the defaults.
CATALOGUE = [
    ("torchvision.densenet121", {"image_size": 32, "in_channels": 1}),
    ("torchvision.resnet50", {"image_size": 32}),
    ("torchvision.efficientnet_b0", {"image_size": 32}),
    ("monai.DenseNet121", {"image_size": 32, "spatial_dims": 2}),
    ("monai.DenseNet121", {"image_size": 32, "spatial_dims": 3}),
    ("monai.resnet18", {"image_size": 16}),
]


@pytest.fixture
def clinic(tmp_path: Path) -> Iterator[Path]:
    with own_package.on_path(tmp_path) as root:
        yield root


def _plan(data: dict[str, Any]) -> SplitPlan:
    return validate(SplitPlan, data, "plan.yaml")


@pytest.mark.parametrize(("name", "args"), CATALOGUE, ids=str)
def test_each_catalogue_network_splits_at_its_default_cuts_and_recomposes_exactly(
    name: str, args: dict[str, Any]
) -> None:
    plan = _plan({"model": {"name": name, "args": args}})
    assert plan.u_shaped and plan.cuts  # the defaults: stem and classifier at the site
    model = plan.model.build(seed=0).eval()
    x = torch.randn(2, *plan.model.input_shape, generator=torch.Generator().manual_seed(1))
    parts = split_model(model, plan)
    assert parts.tail is not None
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(parts.tail(parts.trunk(parts.head(x))), expected)
        assert torch.equal(assemble(parts)(x), expected)
    keys = [set(segment.state_dict()) for segment in parts.segments()]
    assert set().union(*keys) == set(plan.model.state_keys)  # the original names, no overlap
    assert sum(len(k) for k in keys) == len(plan.model.state_keys)
    assert set(plan.tail_keys) and set(plan.tail_keys) <= set(plan.model.state_keys)


def test_catalogue_arguments_are_validated_by_name() -> None:
    with pytest.raises(ConfigError, match=r"model\.args.*spatial_dims"):
        _plan({"model": {"name": "monai.DenseNet121", "args": {"spatial_dims": 4}}})


def test_a_functional_forward_is_cut_by_module_name(clinic: Path) -> None:
    plan = _plan(own_package.plan())
    assert plan.model.traced and plan.cuts == ["stem", "norm"]
    assert plan.head_keys == ("stem.weight", "stem.bias")
    assert set(plan.tail_keys) == {"classifier.weight", "classifier.bias"}
    assert cut_shapes(plan, 4) == {"head_out": (4, 32), "trunk_out": (4, 32), "logits": (4, 2)}
    assert check_recomposition(plan)[0] == 0.0


def test_a_cut_inside_a_skip_connection_is_refused_with_the_reason(clinic: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _plan(own_package.plan(cut="block", tail_cut=None))
    assert caught.value.problems[0][0] == "cut"
    assert "more than one tensor crosses" in str(caught.value) and "stem, norm" in str(caught.value)


def test_an_unknown_module_and_an_empty_trunk_are_refused(clinic: Path) -> None:
    with pytest.raises(ConfigError, match="unknown layer 'stemm'"):
        _plan(own_package.plan(cut="stemm"))
    with pytest.raises(ConfigError, match="the trunk would be empty"):
        _plan(own_package.plan(cut="norm", tail_cut="stem"))


def test_a_forward_that_reads_self_training_is_refused(clinic: Path) -> None:
    data = own_package.plan()
    data["model"] = {"factory": "clinic_nets:build_dropout", "input_shape": [30]}
    with pytest.raises(ConfigError, match=r"reads self\.training"):
        _plan(data)


def test_weights_used_on_both_sides_of_a_cut_are_refused(clinic: Path) -> None:
    data = {"model": {"factory": "clinic_nets:tied", "input_shape": [30]}, "cut": "mid"}
    with pytest.raises(ConfigError, match="used on both sides of a cut"):
        _plan(data)


def test_a_network_that_returns_more_than_logits_is_refused(clinic: Path) -> None:
    data = own_package.plan()
    data["model"] = {"factory": "clinic_nets:two_heads", "input_shape": [30]}
    with pytest.raises(PlanCheckError, match="returns tuple, not one tensor of logits"):
        check_recomposition(_plan(data))


def test_a_factory_needs_an_input_shape_and_a_real_module(clinic: Path) -> None:
    with pytest.raises(ConfigError, match="input_shape: required with factory"):
        _plan({"model": {"factory": own_package.FACTORY}, "cut": "stem"})
    with pytest.raises(ConfigError, match=r"not of the form package\.module:function"):
        _plan({"model": {"factory": "clinic_nets.build", "input_shape": [30]}, "cut": "stem"})
    with pytest.raises(ConfigError, match="cannot import 'no_such_pkg'"):
        _plan({"model": {"factory": "no_such_pkg:build", "input_shape": [30]}, "cut": "x"})


def test_every_segment_exports_to_onnx(clinic: Path) -> None:
    check = check_plan(_plan(own_package.plan()))
    assert check.max_abs_diff == 0.0
    assert set(check.onnx_bytes) == {"head", "trunk", "tail"}
    assert all(size > 0 for size in check.onnx_bytes.values())


# -- weights ----------------------------------------------------------------------------------


def _weights(clinic: Path, tmp_path: Path, change: Any) -> Path:
    state = _plan(own_package.plan()).model.build(seed=5).state_dict()
    change(state)
    path = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_weights_from_a_file_are_the_model_s_starting_point(clinic: Path, tmp_path: Path) -> None:
    path = _weights(clinic, tmp_path, lambda state: None)
    data = own_package.plan()
    data["model"] = {**data["model"], "weights": str(path)}  # type: ignore[dict-item]
    plan = _plan(data)
    expected = _plan(own_package.plan()).model.build(seed=5).state_dict()
    built = plan.model.build(seed=0).state_dict()  # any seed: the file wins
    assert all(torch.equal(built[k], expected[k]) for k in expected)
    assert plan.model.weights_sha256 is not None and len(plan.model.weights_sha256) == 64


def test_a_torch_weights_file_is_read_with_weights_only(clinic: Path, tmp_path: Path) -> None:
    state = _plan(own_package.plan()).model.build(seed=5).state_dict()
    path = tmp_path / "pretrained.pt"
    torch.save({"state_dict": state}, path)
    data = own_package.plan()
    data["model"] = {**data["model"], "weights": str(path)}  # type: ignore[dict-item]
    built = _plan(data).model.build().state_dict()
    assert all(torch.equal(built[k], state[k]) for k in state)


def _missing(state: dict[str, torch.Tensor]) -> None:
    state.pop("norm.weight")


def _misshapen(state: dict[str, torch.Tensor]) -> None:
    state["stem.weight"] = torch.zeros(16, 30)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_missing, r"lacks 'norm\.weight'"),
        (_misshapen, r"'stem\.weight' has shape \(16, 30\).*\(32, 30\)"),
    ],
)
def test_a_weights_file_that_does_not_fit_is_refused_naming_the_key(
    clinic: Path, tmp_path: Path, change: Any, message: str
) -> None:
    path = _weights(clinic, tmp_path, change)
    data = own_package.plan()
    data["model"] = {**data["model"], "weights": str(path)}  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=message):
        _plan(data)


def test_a_weights_file_changed_after_the_job_named_it_is_refused(
    clinic: Path, tmp_path: Path
) -> None:
    path = _weights(clinic, tmp_path, lambda state: None)
    data = own_package.plan()
    data["model"] = {**data["model"], "weights": str(path), "weights_sha256": "0" * 64}  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="not the file the job names"):
        _plan(data)


# -- whose code runs --------------------------------------------------------------------------


def _spec_text(model: dict[str, Any]) -> str:
    """A job spec as a site receives it, naming ``model`` (the aggregator's choice)."""
    spec = json.loads(
        JobSpec(
            job_id="job-t",
            mode="split-u",
            orchestration="sequential",
            plan=validate(SplitPlan, {"model": {"name": "mlp"}, "cut": 1, "tail_cut": 2}, "p"),
            rounds=1,
            local_epochs=1,
            batch_size=8,
            optimizer={"name": "adam", "lr": 0.01},  # type: ignore[arg-type]
            seed=0,
            wire_dtype="float32",
        ).to_meta()
    )
    spec["plan"] = {"model": model, "cut": "stem"}
    return json.dumps(spec)


def test_a_spec_naming_a_factory_the_site_does_not_allow_imports_nothing() -> None:
    module = "hospital_payload_never_imported"
    text = _spec_text({"factory": f"{module}:build", "input_shape": [30]})
    with pytest.raises(FactoryError, match=rf"factory '{module}:build' is not allowed"):
        JobSpec.from_meta(text, allow_factories=("clinic_nets:*",))
    assert module not in sys.modules


def test_a_spec_naming_an_allowed_factory_is_taken(clinic: Path) -> None:
    text = _spec_text({"factory": own_package.FACTORY, "input_shape": [30]})
    spec = JobSpec.from_meta(text, allow_factories=("clinic_nets:*",))
    assert spec.plan.model.factory == own_package.FACTORY and spec.plan.head_keys


def test_catalogue_and_built_in_networks_need_no_allow_list() -> None:
    text = _spec_text({"name": "mlp"})
    data = json.loads(text)
    data["plan"] = {"model": {"name": "mlp"}, "cut": 1}
    assert JobSpec.from_meta(json.dumps(data), allow_factories=()).plan.model.name == "mlp"
