"""A hospital's own model package, written by a test into a folder it puts on the Python path.

``clinic_nets.build`` returns a network whose ``forward`` is not a chain of children: a
residual block around ``block`` and functional activations, for the breast-cancer features.
``clinic_nets.build_dropout`` calls ``F.dropout(..., self.training)`` in ``forward``, which a
traced graph cannot follow; ``clinic_nets.tied`` uses one layer on both sides of ``mid``; ``clinic_nets.two_heads`` returns
a tuple.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PACKAGE = "clinic_nets"
FACTORY = f"{PACKAGE}:build"

SOURCE = """
import torch
import torch.nn.functional as F
from torch import nn


class ResidualMlp(nn.Module):
    def __init__(self, in_features=30, width=32, num_classes=2, dropout=False):
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.block = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_classes)
        self.dropout = dropout

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = self.norm(h + self.block(h))
        if self.dropout:
            h = F.dropout(h, 0.1, self.training)
        return self.classifier(F.relu(h))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(30, 30)
        self.mid = nn.ReLU()
        self.out = nn.Linear(30, 2)

    def forward(self, x):
        return self.out(self.shared(self.mid(self.shared(x))))


def build(in_features=30, width=32, num_classes=2):
    return ResidualMlp(in_features, width, num_classes)


def build_dropout():
    return ResidualMlp(dropout=True)


def tied():
    return Tied()


class TwoHeads(ResidualMlp):
    def forward(self, x):
        logits = super().forward(x)
        return logits, logits.softmax(1)


def two_heads():
    return TwoHeads()
"""


def write_package(root: Path) -> Path:
    """``root/clinic_nets/__init__.py``; returns ``root`` (the folder for ``PYTHONPATH``)."""
    package = root / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(SOURCE)
    return root


@contextmanager
def on_path(root: Path) -> Iterator[Path]:
    """The package importable in this process while the block runs, forgotten after."""
    write_package(root)
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(PACKAGE, None)


def plan(**overrides: object) -> dict[str, object]:
    """A plan of ``clinic_nets.build`` cut after ``stem`` (and, U-shaped, after ``norm``)."""
    return {
        "model": {"factory": FACTORY, "input_shape": [30]},
        "cut": "stem",
        "tail_cut": "norm",
        "private": ["classifier"],
        **overrides,
    }
