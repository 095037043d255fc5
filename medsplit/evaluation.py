"""The metrics clinicians read, per site and pooled over sites, from counts only.

A site evaluates its held-out data into a ``Tally``: per class (one-vs-rest), the confusion
counts at the job's decision rule, a histogram of the class's score among the records that
have it and those that do not, and calibration bins (count, summed confidence, summed outcome).
The score is the class's log-odds, computed from the logits (probabilities round to 0 and 1 for
a confident model), in ``SCORE_BINS`` bins equal in asinh(log-odds / 0.01): 0.0002 wide at
even odds, where an untrained model's scores differ, 0.06 at odds of 20 to 1. No record, no prediction and no score leaves the site --
only counts -- and yet tallies add: the sum of every site's tally is the tally of the pooled
test set, so the aggregator reports pooled metrics that no one could compute by averaging the
sites' own (a pooled AUROC is not the mean of the sites' AUROCs).

From a tally (``summary``):

* **sensitivity** and **specificity**: binary tasks, of the positive class (index 1) at the
  ``threshold`` on its probability; multi-class, the macro means over classes one-vs-rest at
  the argmax; multi-label, the macro means over labels at the threshold;
* **balanced accuracy**: the mean recall over classes (scikit-learn's
  ``balanced_accuracy_score``); multi-label, the mean over labels of (sensitivity +
  specificity) / 2;
* **macro AUROC**: binary, the positive class's AUROC; otherwise the mean one-vs-rest AUROC
  over classes present with both outcomes (scikit-learn's ``roc_auc_score(average="macro")``).
  From the histograms: pairs that share a bin count one half; within 0.0012 of
  scikit-learn's on the same predictions for models up to log-odds of about +-40, 0.015 for
  models so confident that their probabilities round to 0 and 1 (tests/unit/test_evaluation.py);
* **ECE** (expected calibration error, ``CALIBRATION_BINS`` equal-width bins): of the top-label
  confidence against accuracy for single-label tasks (Guo et al., 2017), of every label's
  probability against its frequency for multi-label ones.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

SCORE_BINS = 1024  # 8 KB a class
LOG_ODDS = 100.0  # score bins span log-odds -100..100 ...
LOG_ODDS_SCALE = 0.01  # ... 0.0002 apart at even odds, 0.06 at 3, 1.9 at 100
CALIBRATION_BINS = 15
MAX_CLASSES = 10_000
NAMES = ("balanced_accuracy", "macro_auroc", "sensitivity", "specificity", "ece")


@dataclass(frozen=True)
class Tally:
    """Counts of one evaluation, or of several added together."""

    confusion: np.ndarray  # int64 [C, 2, 2]: per class, [[tn, fp], [fn, tp]]
    scores: np.ndarray  # int32 [C, 2, SCORE_BINS]: its probability among negatives, positives
    calibration: np.ndarray  # float64 [CALIBRATION_BINS, 3]: count, sum confidence, sum outcome
    multilabel: bool = False

    @classmethod
    def of(cls, logits: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> Tally:
        """The tally of a model's ``logits`` [N, C] against ``labels``: class indices [N], or
        multi-hot targets [N, C] for a multi-label task (sigmoid outputs)."""
        z = logits.detach().double().cpu()
        multilabel = labels.dim() == 2
        classes = z.shape[1]
        if multilabel:
            p, log_odds = torch.sigmoid(z).numpy(), z.numpy()
            truth = labels.detach().cpu().numpy() > 0.5
            decided = p >= threshold
            confidence, outcome = p.ravel(), truth.ravel().astype(np.float64)
        else:
            p, log_odds = torch.softmax(z, 1).numpy(), _one_vs_rest_log_odds(z)
            y = labels.detach().cpu().numpy().astype(np.int64)
            truth = np.eye(classes, dtype=bool)[y]
            chosen = (p[:, 1] >= threshold).astype(np.int64) if classes == 2 else p.argmax(1)
            decided = np.eye(classes, dtype=bool)[chosen]
            confidence = p.max(1)
            outcome = (p.argmax(1) == y).astype(np.float64)
        confusion = np.stack(
            [
                [[(~t & ~d).sum(), (~t & d).sum()], [(t & ~d).sum(), (t & d).sum()]]
                for t, d in zip(truth.T, decided.T, strict=True)
            ]
        ).astype(np.int64)
        bins = _score_bin(log_odds)
        scores = np.zeros((classes, 2, SCORE_BINS), dtype=np.int64)
        for c in range(classes):
            scores[c, 0] = np.bincount(bins[~truth[:, c], c], minlength=SCORE_BINS)
            scores[c, 1] = np.bincount(bins[truth[:, c], c], minlength=SCORE_BINS)
        where = _bin(confidence, CALIBRATION_BINS)
        calibration = np.stack(
            [
                np.bincount(where, minlength=CALIBRATION_BINS).astype(np.float64),
                np.bincount(where, weights=confidence, minlength=CALIBRATION_BINS),
                np.bincount(where, weights=outcome, minlength=CALIBRATION_BINS),
            ],
            axis=1,
        )
        return cls(confusion, scores, calibration, multilabel)

    def __add__(self, other: Tally) -> Tally:
        return Tally(
            self.confusion + other.confusion,
            self.scores + other.scores,
            self.calibration + other.calibration,
            self.multilabel,
        )

    @property
    def samples(self) -> int:
        return int(self.confusion[0].sum())

    def summary(self) -> dict[str, float | None]:
        """The clinicians' metrics (``NAMES``); None where undefined (a class never seen)."""
        tn, fp = self.confusion[:, 0, 0], self.confusion[:, 0, 1]
        fn, tp = self.confusion[:, 1, 0], self.confusion[:, 1, 1]
        recall = _ratios(tp, tp + fn)
        true_negative_rate = _ratios(tn, tn + fp)
        aurocs = [_auroc(negative, positive) for negative, positive in self.scores]
        binary = len(self.confusion) == 2 and not self.multilabel
        if binary:
            sensitivity, specificity = recall[1], recall[0]
            balanced = _mean([sensitivity, specificity])
            auroc = aurocs[1]
        else:
            sensitivity, specificity = _mean(recall), _mean(true_negative_rate)
            balanced = (
                _mean(recall)
                if not self.multilabel
                else _mean([_mean([r, s]) for r, s in zip(recall, true_negative_rate, strict=True)])
            )
            auroc = _mean(aurocs)
        return {
            "balanced_accuracy": balanced,
            "macro_auroc": auroc,
            "sensitivity": sensitivity,
            "specificity": specificity,
            "ece": self._ece(),
        }

    def _ece(self) -> float | None:
        count, confidence, outcome = self.calibration.T
        total = float(count.sum())
        if total <= 0:
            return None
        return float(np.abs(outcome - confidence).sum() / total)

    # -- on the wire ------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "confusion": torch.from_numpy(self.confusion.copy()),
            "scores": torch.from_numpy(self.scores.astype(np.int32)),
            "calibration": torch.from_numpy(self.calibration.copy()),
        }

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], samples: int, multilabel: bool = False
    ) -> Tally:
        """A site's tally as received, checked to be counts of ``samples`` records (a tally
        that does not add up is refused: ``ValueError`` naming the tensor)."""
        confusion = tensors["confusion"].numpy().astype(np.int64)
        scores = tensors["scores"].numpy().astype(np.int64)
        calibration = tensors["calibration"].numpy().astype(np.float64)
        if not 2 <= len(confusion) == len(scores) <= MAX_CLASSES:
            raise ValueError(
                f"confusion, scores: one entry per class (2 to {MAX_CLASSES}), alike in both"
            )
        if (confusion < 0).any() or (confusion.sum(axis=(1, 2)) != samples).any():
            raise ValueError(f"confusion: every class's counts must add up to {samples} records")
        if (scores < 0).any() or (scores.sum(axis=(1, 2)) != samples).any():
            raise ValueError(f"scores: every class's histogram must add up to {samples} records")
        if (confusion[:, 1].sum(axis=1) != scores[:, 1].sum(axis=1)).any():
            raise ValueError("scores: positives differ from the confusion counts'")
        count, confidence, outcome = calibration.T
        expected = samples * (len(confusion) if multilabel else 1)
        if not np.isfinite(calibration).all() or abs(float(count.sum()) - expected) > 0.5:
            raise ValueError(f"calibration: bin counts must add up to {expected}")
        if (
            (confidence < 0).any()
            or (confidence > count + 1e-6).any()
            or ((outcome < 0).any() or (outcome > count + 1e-6).any())
        ):
            raise ValueError("calibration: sums must lie between 0 and each bin's count")
        return cls(confusion, scores, calibration, multilabel)


def pooled_tallies(tallies: list[Tally]) -> dict[str, float | None]:
    """The pooled test set's metrics: its samples and the clinicians' metrics.

    Tallies of another number of classes than most sites' (a site that misreports) are left
    out rather than added: they cannot be, and they must not stop the round.
    """
    if not tallies:
        return {}
    counts = Counter(len(t.confusion) for t in tallies)
    classes = counts.most_common(1)[0][0]
    kept = [t for t in tallies if len(t.confusion) == classes]
    total = kept[0]
    for tally in kept[1:]:
        total = total + tally
    return {"samples": float(total.samples), **total.summary()}


def _one_vs_rest_log_odds(logits: torch.Tensor) -> np.ndarray:
    """log(p_c / (1 - p_c)) of a softmax, per class, exactly: z_c - logsumexp(z without c).
    From probabilities instead, a confident model's scores would all round to 0 or 1."""
    columns = []
    for c in range(logits.shape[1]):
        others = torch.cat([logits[:, :c], logits[:, c + 1 :]], dim=1)
        columns.append(logits[:, c] - torch.logsumexp(others, dim=1))
    # Centred on an uninformed model's odds (1 to C - 1), where the score bins are finest.
    return torch.stack(columns, dim=1).numpy() + math.log(logits.shape[1] - 1)


def _score_bin(log_odds: np.ndarray) -> np.ndarray:
    """Score bins equal in asinh(log-odds / LOG_ODDS_SCALE), up to |log-odds| = LOG_ODDS: fine
    near even odds (an early model's scores differ in the third decimal) and relatively alike
    further out (a confident model's differ by whole units); never equal in probability,
    where a confident model's scores all crowd into the end bins."""
    top = np.arcsinh(LOG_ODDS / LOG_ODDS_SCALE)
    spread = np.arcsinh(np.clip(log_odds, -LOG_ODDS, LOG_ODDS) / LOG_ODDS_SCALE)
    return _bin((spread + top) / (2 * top), SCORE_BINS)


def _bin(values: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin of values in [0, 1] (1.0 in the last bin)."""
    binned: np.ndarray = np.minimum((np.clip(values, 0.0, 1.0) * bins).astype(np.int64), bins - 1)
    return binned


def _auroc(negative: np.ndarray, positive: np.ndarray) -> float | None:
    """Probability that a positive scores above a negative (ties: one half), from histograms."""
    negatives, positives = int(negative.sum()), int(positive.sum())
    if negatives == 0 or positives == 0:
        return None
    below = np.cumsum(negative) - negative  # negatives in lower bins
    wins = float((positive * below).sum()) + 0.5 * float((positive * negative).sum())
    return wins / (negatives * positives)


def _ratios(numerator: np.ndarray, denominator: np.ndarray) -> list[float | None]:
    return [
        float(n) / float(d) if d > 0 else None for n, d in zip(numerator, denominator, strict=True)
    ]


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None
