"""Training pieces shared by the edge agent, the aggregator and the centralized baseline.

Everything that must behave identically on both sides of a cut lives here: the optimizer
factory, the batch order (a site and the centralized reference see batches in the same order
for the same seed and epoch, which is what makes split training exactly reproducible), the loss
and the evaluation metrics.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from medsplit.config import OptimizerConfig
from medsplit.evaluation import NAMES, Tally
from medsplit.precision import MixedPrecision


def make_optimizer(
    params: Iterable[nn.Parameter], config: OptimizerConfig
) -> torch.optim.Optimizer:
    params = list(params)
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def batch_order(samples: int, batch_size: int, *, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index batches for one epoch: a permutation that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(samples, generator=generator)
    return list(order.split(batch_size))


def micro_batches(samples: int, count: int) -> list[slice]:
    """A batch of ``samples`` cut into ``count`` contiguous micro-batches of near-equal size
    (fewer when the batch is smaller than ``count``; none is empty)."""
    count = max(1, min(count, samples))
    size, extra = divmod(samples, count)
    bounds = [0]
    for index in range(count):
        bounds.append(bounds[-1] + size + (index < extra))
    return [slice(start, end) for start, end in itertools.pairwise(bounds)]


def loss_shares(
    labels: torch.Tensor, parts: list[slice], class_weights: torch.Tensor | None = None
) -> list[float]:
    """Each micro-batch's share of the batch's loss (``loss_fn``), so that the micro-batches'
    losses, each weighed by its share, add up to the batch's, and so do their gradients:
    its rows' share, or under class-weighted cross-entropy (a weighted mean) its weight's."""
    if len(parts) == 1:
        return [1.0]
    if class_weights is None or labels.dim() == 2:  # BCE's pos_weight keeps a plain mean
        return [(part.stop - part.start) / len(labels) for part in parts]
    weights = class_weights.to(labels.device)[labels].double()
    total = float(weights.sum())
    return [float(weights[part].sum()) / total for part in parts]


def entry(received: torch.Tensor) -> torch.Tensor:
    """What a segment starts from when its input came over the wire: a differentiable copy.

    The received tensor is a leaf whose gradient is the answer; a segment whose first
    operation works in place (torchvision's DenseNet ends ``features`` with
    ``F.relu(x, inplace=True)``) may not write into a leaf, but may into its copy, and the
    copy's gradient flows back into the leaf unchanged."""
    return received.clone() if received.requires_grad else received


def loss_fn(
    logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of class indices, or binary cross-entropy per label of multi-hot targets
    [N, C]; ``class_weights`` weigh each class (multi-label: each label's positives)."""
    weights = None if class_weights is None else class_weights.to(logits.device, logits.dtype)
    if labels.dim() == 2:
        return nn.functional.binary_cross_entropy_with_logits(
            logits, labels.to(logits.dtype), pos_weight=weights
        )
    return nn.functional.cross_entropy(logits, labels, weight=weights)


@dataclass(frozen=True)
class Metrics:
    loss: float
    accuracy: float
    auroc: float | None  # binary tasks with both classes present; None otherwise
    samples: int
    # The clinicians' metrics (medsplit.evaluation.NAMES) and the counts they come from.
    clinical: dict[str, float | None] = field(default_factory=dict)
    tally: Tally | None = None

    def as_meta(self) -> dict[str, float | int | None]:
        return {
            "loss": self.loss if math.isfinite(self.loss) else None,  # JSON has no NaN
            "accuracy": self.accuracy,
            "auroc": self.auroc,
            "samples": self.samples,
            **self.clinical,
        }


def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> Metrics:
    """Held-out metrics of ``logits`` [N, C]; ``threshold`` is the decision rule's for a
    binary task's positive class (sensitivity and specificity are read there)."""
    if labels.dim() == 2:
        return _evaluate_multilabel(logits, labels, threshold)
    with torch.no_grad():
        loss = float(loss_fn(logits, labels))
        accuracy = float((logits.argmax(1) == labels).float().mean())
        auroc = None
        # A model poisoned into non-finite outputs still gets its metrics (not an exception
        # that stalls the round): its accuracy says what it is worth, and AUROC is undefined.
        finite = bool(torch.isfinite(logits).all())
        probabilities = logits.float().softmax(1) if finite else None
        if probabilities is not None and logits.shape[1] == 2 and len(labels.unique()) == 2:
            scores = probabilities[:, 1].numpy()
            from sklearn.metrics import roc_auc_score  # noqa: PLC0415 - only sites evaluate

            auroc = float(roc_auc_score(labels.numpy(), scores))
    return _metrics(logits, labels, threshold, loss=loss, accuracy=accuracy, auroc=auroc)


def _evaluate_multilabel(logits: torch.Tensor, labels: torch.Tensor, threshold: float) -> Metrics:
    """Multi-label: accuracy is the share of (record, label) decisions right at the threshold."""
    with torch.no_grad():
        loss = float(loss_fn(logits, labels))
        decided = torch.sigmoid(logits.float()) >= threshold
        accuracy = float((decided == (labels > 0.5)).float().mean())
    return _metrics(logits, labels, threshold, loss=loss, accuracy=accuracy, auroc=None)


def _metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    threshold: float,
    *,
    loss: float,
    accuracy: float,
    auroc: float | None,
) -> Metrics:
    """The metrics with their tally. Always a tally, so the aggregator's counts add up; a
    poisoned model's non-finite logits are clamped first, and its clinical metrics are None."""
    tally = Tally.of(torch.nan_to_num(logits.double(), 0.0, 1e4, -1e4), labels, threshold)
    finite = bool(torch.isfinite(logits).all())
    clinical = tally.summary() if finite else dict.fromkeys(NAMES)
    loss = loss if math.isfinite(loss) else float("nan")
    return Metrics(loss, accuracy, auroc, len(labels), clinical, tally)


def train_centralized(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    optimizer: OptimizerConfig,
    seed: int,
    first_epoch: int = 0,
) -> list[float]:
    """The baseline every split mode is compared with: the whole model, all data, one place."""
    opt = make_optimizer(model.parameters(), optimizer)
    return train_epochs(
        model, opt, x, y, epochs=epochs, batch_size=batch_size, seed=seed, first_epoch=first_epoch
    )


def train_epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    first_epoch: int = 0,
    amp: MixedPrecision | None = None,
    class_weights: torch.Tensor | None = None,
) -> list[float]:
    """Plain local training with a given optimizer (kept by the caller across calls), in
    ``amp``'s precision (default float32), the loss weighted by ``class_weights``."""
    amp = amp or MixedPrecision("fp32", x.device)
    losses = []
    model.train()
    for epoch in range(first_epoch, first_epoch + epochs):
        total = 0.0
        for idx in batch_order(len(y), batch_size, seed=seed, epoch=epoch):
            opt.zero_grad()
            with amp.autocast():
                loss = loss_fn(model(x[idx]), y[idx], class_weights)
            amp.backward(loss)
            amp.step(opt)
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(y))
    return losses


def evaluate_model(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, threshold: float = 0.5
) -> Metrics:
    """Held-out metrics of a whole model, in evaluation mode."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
    return evaluate_logits(logits, y, threshold)
