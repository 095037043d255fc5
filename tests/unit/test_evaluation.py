"""The clinicians' metrics, per site and pooled from counts, against scikit-learn's on the same
predictions; a tally that does not add up is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, recall_score, roc_auc_score

from edge_agent.data import datasets
from experiments.inprocess import run_job
from medsplit.evaluation import CALIBRATION_BINS, Tally, pooled_tallies
from medsplit.transport import MemoryBroker
from medsplit.wiring import memory_connector
from tests.support.configs import job_config


def _sites(classes: int, multilabel: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three sites' predictions of different sizes and skill, as logits and labels."""
    generator = torch.Generator().manual_seed(classes)
    out = []
    for size, skill in ((40, 0.5), (150, 1.5), (400, 3.0)):
        if multilabel:
            labels = (torch.rand(size, classes, generator=generator) < 0.3).float()
            logits = torch.randn(size, classes, generator=generator) + skill * (labels - 0.5)
            out.append((logits, labels))
            continue
        labels = torch.randint(0, classes, (size,), generator=generator)
        logits = torch.randn(size, classes, generator=generator)
        logits += skill * torch.nn.functional.one_hot(labels, classes)
        out.append((logits, labels))
    return out


def _ece(confidence: np.ndarray, outcome: np.ndarray) -> float:
    """Expected calibration error from scikit-learn's reliability curve and the bins' sizes."""
    observed, predicted = calibration_curve(outcome, confidence, n_bins=CALIBRATION_BINS)
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    counts = np.histogram(confidence, edges)[0]
    counts = counts[counts > 0]
    return float((np.abs(observed - predicted) * counts).sum() / counts.sum())


def _specificity(y: np.ndarray, decided: np.ndarray) -> float:
    tn, fp, _, _ = confusion_matrix(y, decided, labels=[0, 1]).ravel()
    return float(tn / (tn + fp))


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_binary_pooled_metrics_match_scikit_learn(threshold: float) -> None:
    sites = _sites(2)
    pooled = pooled_tallies([Tally.of(p, y, threshold) for p, y in sites])
    p = torch.cat([s[0] for s in sites]).softmax(1).numpy()
    y = torch.cat([s[1] for s in sites]).numpy()
    decided = (p[:, 1] >= threshold).astype(int)
    assert pooled["samples"] == len(y)
    assert pooled["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, decided))
    assert pooled["sensitivity"] == pytest.approx(recall_score(y, decided))
    assert pooled["specificity"] == pytest.approx(_specificity(y, decided))
    assert pooled["macro_auroc"] == pytest.approx(roc_auc_score(y, p[:, 1]), abs=1e-3)
    correct = (p.argmax(1) == y).astype(float)
    assert pooled["ece"] == pytest.approx(_ece(p.max(1), correct))
    # The pooled test set is not the mean of the sites': the small, weak site weighs less.
    own = [Tally.of(p, y, threshold).summary()["balanced_accuracy"] for p, y in sites]
    assert pooled["balanced_accuracy"] != pytest.approx(sum(own) / len(own))  # type: ignore[arg-type]


def test_multiclass_pooled_metrics_match_scikit_learn() -> None:
    sites = _sites(4)
    pooled = pooled_tallies([Tally.of(p, y) for p, y in sites])
    p = torch.cat([s[0] for s in sites]).softmax(1).numpy()
    y = torch.cat([s[1] for s in sites]).numpy()
    decided = p.argmax(1)
    assert pooled["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, decided))
    assert pooled["sensitivity"] == pytest.approx(recall_score(y, decided, average="macro"))
    matrix = confusion_matrix(y, decided)
    negatives = matrix.sum() - matrix.sum(1)
    false_positives = matrix.sum(0) - np.diag(matrix)
    specificity = np.mean((negatives - false_positives) / negatives)
    assert pooled["specificity"] == pytest.approx(specificity)
    auroc = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert pooled["macro_auroc"] == pytest.approx(auroc, abs=1e-3)
    assert pooled["ece"] == pytest.approx(_ece(p.max(1), (decided == y).astype(float)))


def test_multilabel_pooled_metrics_match_scikit_learn() -> None:
    sites = _sites(3, multilabel=True)
    pooled = pooled_tallies([Tally.of(p, y) for p, y in sites])
    p = torch.cat([s[0] for s in sites]).sigmoid().numpy()
    y = torch.cat([s[1] for s in sites]).numpy().astype(int)
    decided = (p >= 0.5).astype(int)
    sensitivity = recall_score(y, decided, average="macro")
    specificity = np.mean([_specificity(y[:, c], decided[:, c]) for c in range(3)])
    assert pooled["sensitivity"] == pytest.approx(sensitivity)
    assert pooled["specificity"] == pytest.approx(specificity)
    per_label = [balanced_accuracy_score(y[:, c], decided[:, c]) for c in range(3)]
    assert pooled["balanced_accuracy"] == pytest.approx(np.mean(per_label))
    assert pooled["macro_auroc"] == pytest.approx(roc_auc_score(y, p, average="macro"), abs=1e-3)
    assert pooled["ece"] == pytest.approx(_ece(p.ravel(), y.ravel().astype(float)))


def test_a_tally_that_does_not_add_up_is_refused() -> None:
    p, y = _sites(2)[1]
    tensors = Tally.of(p, y).tensors()
    assert Tally.from_tensors(tensors, len(y)).samples == len(y)
    with pytest.raises(
        ValueError, match=f"confusion: every class's counts must add up to {len(y) + 1}"
    ):
        Tally.from_tensors(tensors, len(y) + 1)
    spoiled = {**tensors, "scores": tensors["scores"].clone()}
    spoiled["scores"][0, 0, 0] += 1
    spoiled["scores"][0, 0, 1] -= 1 + int(spoiled["scores"][0, 0, 1])
    with pytest.raises(ValueError, match="scores"):
        Tally.from_tensors(spoiled, len(y))
    lying = {**tensors, "calibration": tensors["calibration"] * torch.tensor([1.0, 5.0, 1.0])}
    with pytest.raises(ValueError, match="calibration: sums must lie"):
        Tally.from_tensors(lying, len(y))
    three = Tally.of(torch.eye(3), torch.arange(3)).tensors()
    with pytest.raises(ValueError, match="alike in both"):
        Tally.from_tensors({**tensors, "scores": three["scores"]}, len(y))


def test_a_tally_of_another_class_count_is_left_out_of_the_pool() -> None:
    binary = [Tally.of(p, y) for p, y in _sites(2)]
    stray = Tally.of(torch.eye(3), torch.arange(3))
    assert pooled_tallies([*binary, stray]) == pooled_tallies(binary)


def test_a_job_reports_each_site_s_metrics_and_the_pooled_test_set_s() -> None:
    names = ["site-a", "site-b", "site-c"]
    shares = {
        name: datasets.share("breast-cancer", "dirichlet:0.5", 3, i, seed=0)
        for i, name in enumerate(names)
    }
    config = job_config(
        {"job_id": "m", "plan": "mlp-ehr", "mode": "fedavg", "rounds": 1, "sites": names,
         "training": {"batch_size": 32, "threshold": 0.4}},
    )  # fmt: skip
    result = run_job(config, shares, memory_connector(MemoryBroker()))
    record = result.history[-1]
    model = config.plan.model.build(seed=0)
    model.load_state_dict(result.final_model())
    model.eval()
    with torch.no_grad():
        p = torch.cat([model(s.x_test).double().softmax(1) for s in shares.values()]).numpy()
    y = torch.cat([s.y_test for s in shares.values()]).numpy()
    decided = (p[:, 1] >= 0.4).astype(int)
    assert record.pooled["samples"] == len(y)
    assert record.pooled["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, decided))
    assert record.pooled["macro_auroc"] == pytest.approx(roc_auc_score(y, p[:, 1]), abs=1e-3)
    for name in names:
        site = record.metrics[name]
        assert {"balanced_accuracy", "macro_auroc", "sensitivity", "specificity", "ece"} <= set(
            site
        )
