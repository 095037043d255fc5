from __future__ import annotations

import threading

import pytest
import torch
from pydantic import ValidationError

from models import UnknownArchitectureError, build, layer_names, load_plan, names
from models.registry import get


def test_registry_lists_the_built_in_and_catalogue_architectures() -> None:
    assert names() == sorted(
        [
            "cnn",
            "mlp",
            "resnet18",
            "torchvision.densenet121",
            "torchvision.resnet50",
            "torchvision.efficientnet_b0",
            "monai.DenseNet121",
            "monai.resnet18",
            "vertical",
        ]
    )


@pytest.mark.parametrize(
    ("name", "args", "batch"),
    [
        ("mlp", {"in_features": 30}, torch.randn(4, 30)),
        ("cnn", {"image_size": 64}, torch.randn(4, 1, 64, 64)),
        ("resnet18", {"image_size": 64, "num_classes": 3}, torch.randn(2, 1, 64, 64)),
        ("resnet18", {"image_size": 32, "stem": "compact", "width": 8}, torch.randn(2, 1, 32, 32)),
    ],
)
def test_each_architecture_maps_inputs_to_class_logits(
    name: str, args: dict[str, object], batch: torch.Tensor
) -> None:
    model = build(name, args)
    num_classes = get(name).parse_args(args).num_classes
    assert model(batch).shape == (batch.shape[0], num_classes)
    assert get(name).input_shape(args) == tuple(batch.shape[1:])


def test_models_are_named_block_sequences() -> None:
    assert layer_names("cnn") == ["conv1", "conv2", "conv3", "fc", "classifier"]
    assert layer_names("mlp", {"hidden": [8, 8, 8]}) == [
        "hidden1",
        "hidden2",
        "hidden3",
        "classifier",
    ]
    assert layer_names("resnet18") == [
        "stem",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "pool",
        "classifier",
    ]


def test_resnet18_has_resnet18_parameter_count() -> None:
    model = build("resnet18", {"num_classes": 1000, "in_channels": 3})
    # torchvision's resnet18 has 11,689,512 parameters.
    assert sum(p.numel() for p in model.parameters()) == 11_689_512


def test_unknown_architecture_names_the_allowed_ones() -> None:
    with pytest.raises(UnknownArchitectureError, match=r"allowed: cnn, mlp, monai\.DenseNet121"):
        build("vgg")


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ValidationError, match="num_classes"):
        build("cnn", {"num_classes": 1})
    with pytest.raises(ValidationError, match="num_clases"):
        build("mlp", {"num_clases": 2})
    with pytest.raises(ValidationError, match="hidden"):
        build("mlp", {"hidden": [4, 0]})


def test_seeded_builds_are_identical_while_another_thread_builds() -> None:
    """A build draws from the global generator: an unseeded build in another thread (a site
    working out its cut shapes while its neighbour builds, in the in-process runner) must not
    draw from the middle of a seeded one."""
    plan = load_plan("resnet18-cxr")
    stop = threading.Event()

    def build_unseeded() -> None:
        while not stop.is_set():
            plan.model.build()

    other = threading.Thread(target=build_unseeded)
    other.start()
    try:
        first = plan.model.build(seed=3).state_dict()
        builds = [plan.model.build(seed=3).state_dict() for _ in range(10)]
    finally:
        stop.set()
        other.join()
    assert all(torch.equal(first[k], state[k]) for state in builds for k in first)
