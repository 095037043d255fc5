"""The two baselines every collaborative mode is judged against; no network involved.

* ``centralized``: all sites' training data pooled in one place (what privacy rules forbid):
  the upper bound a collaboration hopes to reach.
* ``local``: each site trains alone on its own data: what a hospital gets without collaborating.

Both use the job's model, optimizer, batch size, seed and batch order, train ``local_epochs``
per round for ``rounds`` rounds, and evaluate every site on its own held-out split each round,
so their records read exactly like a distributed job's.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from aggregator.config import JobConfig
from aggregator.state import RoundRecord
from edge_agent.data.datasets import SiteData, pooled
from medsplit.evaluation import pooled_tallies
from medsplit.statistics import class_counts, class_weights
from medsplit.training import evaluate_model, make_optimizer, train_epochs
from models import cut_shapes


def _weights(config: JobConfig, sites: dict[str, SiteData]) -> torch.Tensor | None:
    """The job's class weights, as its statistics round would combine them."""
    if config.training.class_weights != "balanced":
        return None
    shares = list(sites.values())
    multilabel = shares[0].y_train.dim() == 2
    classes = int(cut_shapes(config.plan, 1)["logits"][-1])
    counts = [class_counts(s.y_train, classes) for s in shares]
    return class_weights(counts, sum(len(s.y_train) for s in shares), multilabel)


def run_centralized(config: JobConfig, sites: dict[str, SiteData]) -> list[RoundRecord]:
    model = config.plan.model.build(seed=config.seed)
    weights = _weights(config, sites)
    optimizer = make_optimizer(model.parameters(), config.training.optimizer)
    everything = pooled(list(sites.values()))
    history = []
    for round in range(config.rounds.count):
        started = time.perf_counter()
        losses = train_epochs(
            model,
            optimizer,
            everything.x_train,
            everything.y_train,
            epochs=config.training.local_epochs,
            batch_size=config.training.batch_size,
            seed=config.seed,
            first_epoch=round * config.training.local_epochs,
            class_weights=weights,
        )
        record = RoundRecord(round, train_loss={"pooled": sum(losses) / len(losses)})
        record.train_seconds = time.perf_counter() - started
        _evaluate(record, dict.fromkeys(sites, model), sites, config.training.threshold)
        record.seconds = time.perf_counter() - started
        history.append(record)
    return history


def run_local(config: JobConfig, sites: dict[str, SiteData]) -> list[RoundRecord]:
    models = {site: config.plan.model.build(seed=config.seed) for site in sites}
    optimizers = {
        site: make_optimizer(model.parameters(), config.training.optimizer)
        for site, model in models.items()
    }
    weights = _weights(config, sites)
    history = []
    for round in range(config.rounds.count):
        started = time.perf_counter()
        record = RoundRecord(round)
        for site, data in sites.items():
            losses = train_epochs(
                models[site],
                optimizers[site],
                data.x_train,
                data.y_train,
                epochs=config.training.local_epochs,
                batch_size=config.training.batch_size,
                seed=config.seed,
                first_epoch=round * config.training.local_epochs,
                class_weights=weights,
            )
            record.train_loss[site] = sum(losses) / len(losses)
        record.train_seconds = time.perf_counter() - started
        _evaluate(record, models, sites, config.training.threshold)
        record.seconds = time.perf_counter() - started
        history.append(record)
    return history


def _evaluate(
    record: RoundRecord, models: dict[str, nn.Module], sites: dict[str, SiteData], threshold: float
) -> None:
    """Every site's held-out metrics, and the pooled test set's from their tallies."""
    results = {
        site: evaluate_model(models[site], data.x_test, data.y_test, threshold)
        for site, data in sites.items()
    }
    record.metrics = {site: metrics.as_meta() for site, metrics in results.items()}
    record.pooled = pooled_tallies([m.tally for m in results.values() if m.tally is not None])
