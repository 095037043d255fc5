"""The built-in architectures, each an ``nn.Sequential`` of *named blocks*.

Why sequential: a split plan cuts a model between consecutive blocks, and a federated strategy
averages parameters by name. Keeping every architecture a flat sequence of named blocks makes
both operations trivial and exact: the head, trunk and tail are slices of the same sequence and
their state-dict keys are exactly the keys of the full model.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MlpArgs(_Args):
    """A multi-layer perceptron for EHR feature vectors (e.g. 30 features per patient)."""

    in_features: int = Field(30, ge=1)
    hidden: tuple[int, ...] = Field((64, 32), min_length=1)
    num_classes: int = Field(2, ge=2)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, widths: tuple[int, ...]) -> tuple[int, ...]:
        if any(w < 1 for w in widths):
            raise ValueError(f"every hidden width must be >= 1, got {list(widths)}")
        return widths

    def input_shape(self) -> tuple[int, ...]:
        return (self.in_features,)


class CnnArgs(_Args):
    """A small conv net for 1-channel images; each conv block halves the spatial size."""

    in_channels: int = Field(1, ge=1)
    image_size: int = Field(64, ge=8)
    channels: tuple[int, ...] = Field((16, 32, 64), min_length=1)
    hidden: int = Field(128, ge=1)
    num_classes: int = Field(2, ge=2)

    @field_validator("channels")
    @classmethod
    def _positive_channels(cls, channels: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 1 for c in channels):
            raise ValueError(f"every channel count must be >= 1, got {list(channels)}")
        return channels

    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.image_size, self.image_size)


class ResNet18Args(_Args):
    """ResNet-18 for 1-channel images of a configurable size.

    ``stem="imagenet"`` is the usual 7x7/2 convolution and max-pool (good from ~64 px up);
    ``stem="compact"`` is a 3x3/1 convolution without pooling, for small images (28-48 px).
    """

    in_channels: int = Field(1, ge=1)
    image_size: int = Field(64, ge=16)
    num_classes: int = Field(2, ge=2)
    width: int = Field(64, ge=4, description="channels of the first stage; doubled each stage")
    stem: Literal["imagenet", "compact"] = "imagenet"

    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.image_size, self.image_size)


def build_mlp(args: MlpArgs) -> nn.Sequential:
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    width = args.in_features
    for index, hidden in enumerate(args.hidden, start=1):
        layers: list[nn.Module] = [nn.Linear(width, hidden), nn.ReLU()]
        if args.dropout > 0:
            layers.append(nn.Dropout(args.dropout))
        blocks[f"hidden{index}"] = nn.Sequential(*layers)
        width = hidden
    blocks["classifier"] = nn.Linear(width, args.num_classes)
    return nn.Sequential(blocks)


def build_cnn(args: CnnArgs) -> nn.Sequential:
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    channels_in, size = args.in_channels, args.image_size
    for index, channels_out in enumerate(args.channels, start=1):
        if size < 2:
            raise ValueError(
                f"image_size {args.image_size} is too small for {len(args.channels)} conv blocks"
            )
        blocks[f"conv{index}"] = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        channels_in, size = channels_out, size // 2
    blocks["fc"] = nn.Sequential(
        nn.Flatten(), nn.Linear(channels_in * size * size, args.hidden), nn.ReLU()
    )
    blocks["classifier"] = nn.Linear(args.hidden, args.num_classes)
    return nn.Sequential(blocks)


class BasicBlock(nn.Module):
    """The two-convolution residual block of ResNet-18/34 (He et al., 2016)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: torch.Tensor = self.relu(out + self.shortcut(x))
        return result


def build_resnet18(args: ResNet18Args) -> nn.Sequential:
    width = args.width
    if args.stem == "imagenet":
        stem = nn.Sequential(
            nn.Conv2d(args.in_channels, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
    else:
        stem = nn.Sequential(
            nn.Conv2d(args.in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
    blocks: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
    channels_in = width
    for stage in range(4):
        channels_out = width * 2**stage
        stride = 1 if stage == 0 else 2
        blocks[f"layer{stage + 1}"] = nn.Sequential(
            BasicBlock(channels_in, channels_out, stride),
            BasicBlock(channels_out, channels_out, 1),
        )
        channels_in = channels_out
    blocks["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    blocks["classifier"] = nn.Linear(channels_in, args.num_classes)
    return nn.Sequential(blocks)
