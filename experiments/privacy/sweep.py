"""Run every privacy cell and score the attacks against the sites' real records.

A cell is one mode x defense x seed (and partition, site count, orchestration). Each runs as a
real job through a real broker, with the aggregator's ``WireTap`` keeping what it received in
the first and the last round. The attacker's public auxiliary data is a stratified slice of the
dataset that no site holds, standardised as the federation's sites are (the aggregator learns
those statistics in the statistics round). Every attack targets one site, ``site-01``: the
decoder is trained per attacked head, and one is what a report needs to show the leak.

Scoring -- and only scoring -- uses the site's records: the step of every tapped message names
its batch, and the batch order is a function of the job's seed and the round.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from rich.console import Console
from sklearn.model_selection import train_test_split
from torch import nn

from aggregator.config import JobConfig
from aggregator.wire_tap import WireTap
from edge_agent.data import datasets
from edge_agent.data.datasets import Dataset, SiteData
from edge_agent.data.inputs import DataCard, FeatureInput, FileInput
from experiments.config import BASELINES, Cell, ExperimentConfig, PrivacySettings
from experiments.inprocess import JobResult, run_job
from experiments.privacy import attacks
from experiments.runner import CELL_FAILURES, connector_for, run_grid
from medsplit.modes import MODES, Mode, labels_travel
from medsplit.privacy import measures
from medsplit.protocol import Kind
from medsplit.protocol.spec import SEAL, exchanged_keys
from medsplit.training import batch_order
from models import split_model

TARGET = "site-01"
KNOWN_LABELS = (10, 40)  # model completion with this many labels known (Fu et al.)
UNSPLIT_RECORDS, UNSPLIT_STEPS = 256, 600
UNSPLIT_IMAGES, UNSPLIT_STEPS_IMAGES = 64, 300  # a CNN head on CPU: fewer, shorter
GEIPING_STEPS, GEIPING_STEPS_IMAGES = 300, 60  # attacker's iterations (images: costly)


@dataclass
class Measured:
    """What one cell's attacks achieved against ``site-01`` (None: not applicable)."""

    cell: Cell
    status: str = "completed"
    error: str = ""
    accuracy: float | None = None
    exposed_weights: float | None = None  # share of the model's parameters a site sends
    input_dcor: float | None = None
    sealed: bool | None = None  # split modes: the head and tail travelled sealed
    reconstruction_gain: float | None = None  # white-box: 1 - MSE(attack) / MSE(mean guess)
    reconstruction_mse: float | None = None
    baseline_mse: float | None = None
    ssim: float | None = None
    baseline_ssim: float | None = None
    surrogate_gain: float | None = None  # black-box: a shadow head from the auxiliary slice
    unsplit_gain: float | None = None  # black-box: surrogate head and inputs optimised together
    label_leak: dict[str, float] = field(default_factory=dict)  # attack -> leak AUC
    update_gain: float | None = None  # federated: first-layer inversion of one update (median)
    update_baseline: float | None = None  # the same score for public records as "candidates"
    geiping_gain: float | None = None  # federated: inverting gradients over the whole round
    note: str = ""
    seconds: float = 0.0


def privacy_cells(config: ExperimentConfig) -> list[Cell]:
    """The experiment's distributed cells, each with every defense that applies to its mode."""
    cells = []
    for cell in config.cells():
        if cell.mode in BASELINES:
            continue
        traits = MODES[Mode(cell.mode)]
        for defense in config.privacy_settings.settings():
            if (defense.active or defense.gradient_noise is None) and not traits.cut_layer:
                continue  # federated modes send weights: there is nothing to defend this way
            if defense.gradient_noise is None and traits.labels_travel:
                continue  # split's defaults are no defense: its row is the undefended one
            if defense.gradient_noise and traits.labels_travel:
                continue
            cells.append(replace(cell, defense=defense))
    return cells


def public_slice(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(what the sites divide, the attacker's public slice), stratified by label."""
    idx = np.arange(len(dataset.y))
    private, public = train_test_split(
        idx, test_size=fraction, random_state=seed, stratify=dataset.y.numpy()
    )
    private, public = np.sort(private), np.sort(public)
    return (
        replace(dataset, x=dataset.x[private], y=dataset.y[private]),
        replace(dataset, x=dataset.x[public], y=dataset.y[public]),
    )


def standardised_like(x: torch.Tensor, card: DataCard | None) -> torch.Tensor:
    """``x`` in the sites' encoding: the mean and std their data card records."""
    if card is None:
        raise ValueError("the sites' data has no card: cannot encode the auxiliary slice")
    if isinstance(card.input, FileInput):
        pre = card.input.preprocessing
        return torch.stack([pre.standardise(image) for image in x])
    assert isinstance(card.input, FeatureInput)
    return (x - torch.tensor(card.input.mean)) / torch.tensor(card.input.std)


def run_privacy(
    config: ExperimentConfig,
    *,
    console: Console | None = None,
    on_result: Callable[[Measured], None] | None = None,
) -> list[Measured]:
    def run(cell: Cell, url: str, protocol: str) -> Measured:
        return measure_cell(config, cell, url, protocol)

    return run_grid(config, privacy_cells(config), run, console=console, on_result=on_result)


def measure_cell(config: ExperimentConfig, cell: Cell, broker_url: str, protocol: str) -> Measured:
    """Run the cell's job with the tap on, then every attack that applies to its mode."""
    started = time.monotonic()
    settings = config.privacy_settings
    job = config.job_config(cell, broker_url, protocol)
    private, public = public_slice(
        datasets.load(config.dataset, seed=cell.seed), settings.auxiliary_fraction, cell.seed
    )
    shares = datasets.all_sites(private, cell.sites, cell.partition, seed=cell.seed)
    sites = dict(zip(job.sites, shares, strict=True))
    aux = standardised_like(public.x, shares[0].card)
    tap = WireTap(rounds={0, job.rounds.count - 1})
    result = Measured(cell)
    try:
        outcome = run_job(job, sites, connector_for(job), timeout=config.timeout_s, tap=tap)
    except CELL_FAILURES as exc:
        result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
        result.seconds = time.monotonic() - started
        return result
    result.accuracy = outcome.history[-1].mean()["accuracy"] if outcome.history else None
    result.exposed_weights = _exposed_share(job)
    target = _Target(job, settings, tap, outcome, sites[TARGET], aux, public.y)
    if MODES[job.mode].cut_layer:
        _attack_split(result, target)
    else:
        _attack_update(result, target)
    result.seconds = time.monotonic() - started
    return result


def _exposed_share(job: JobConfig) -> float:
    with torch.device("meta"):
        state = job.plan.model.build().state_dict()
    sent = set(exchanged_keys(job.plan, job.mode))
    total = sum(t.numel() for t in state.values())
    return float(sum(t.numel() for k, t in state.items() if k in sent) / total)


def round_batches(job: JobConfig, samples: int, round: int) -> list[torch.Tensor]:
    """The index batches of ``round``, step by step, as the site drew them."""
    epochs = job.training.local_epochs
    return [
        batch
        for epoch in range(round * epochs, (round + 1) * epochs)
        for batch in batch_order(samples, job.training.batch_size, seed=job.seed, epoch=epoch)
    ]


def _segment(job: JobConfig, weights: dict[str, torch.Tensor], which: str) -> nn.Sequential:
    parts = split_model(job.plan.model.build(), job.plan)
    module: nn.Sequential = getattr(parts, which)
    module.load_state_dict({k: weights[k] for k in module.state_dict()})
    return module


@dataclass(frozen=True)
class _Target:
    """What one cell's attacks work from: the job, the tap and the auxiliary slice (the
    attacker's knowledge), and the site's records (for scoring only)."""

    job: JobConfig
    settings: PrivacySettings
    tap: WireTap
    outcome: JobResult
    site: SiteData
    aux: torch.Tensor
    aux_y: torch.Tensor


def _attack_split(result: Measured, target: _Target) -> None:
    job, settings, tap, site = target.job, target.settings, target.tap, target.site
    last = job.rounds.count - 1
    sent = tap.messages(TARGET, Kind.ACTIVATIONS, last)
    weights = _plaintext_segments(target, last)
    if not sent or weights is None:
        result.note = "the tap holds no activations of the last round"
        return
    batches = round_batches(job, site.train_samples, last)
    rows = torch.cat([batches[m.step] for m in sent])
    x, h = site.x_train[rows], torch.cat([m.tensors["h"].float() for m in sent])
    keep = torch.randperm(len(rows), generator=torch.Generator().manual_seed(job.seed))
    keep = keep[: settings.dcor_samples]
    result.input_dcor = float(measures.distance_correlation(x[keep].double(), h[keep].double()))
    head = _segment(job, weights, "head")
    decoder = attacks.train_inversion(
        head,
        target.aux,
        noise=_noise_std(job),
        epochs=settings.attack_epochs,
        seed=job.seed,
    )
    guess = target.aux.mean(0, keepdim=True)
    reconstruction = attacks.invert(decoder, h)
    result.reconstruction_gain = measures.reconstruction_gain(reconstruction, x, guess)
    result.reconstruction_mse = measures.mse(reconstruction, x)
    result.baseline_mse = measures.mse(guess, x)
    if x.dim() == 4:
        span = float(x.max() - x.min())
        result.ssim = measures.ssim(reconstruction, x, span)
        result.baseline_ssim = measures.ssim(guess, x, span)
    result.sealed = bool(target.outcome.coordinator.sealed)
    _black_box_inversion(result, target, x, h, guess)
    if labels_travel(job.mode, job.plan.u_shaped):
        result.label_leak = {"labels sent": 1.0}
        return
    tail = _segment(job, weights, "tail") if job.plan.u_shaped else None
    result.label_leak = _label_attacks(target, h, site.y_train[rows], batches, tail)


def _black_box_inversion(
    result: Measured, target: _Target, x: torch.Tensor, h: torch.Tensor, guess: torch.Tensor
) -> None:
    """What the aggregator inverts without the head: a shadow head trained on the auxiliary
    slice, and UnSplit's joint optimisation, both from the job's initial weights."""
    job, settings = target.job, target.settings
    trunk = target.outcome.coordinator.trunk
    if trunk is None:
        return
    initial = split_model(job.plan.model.build(seed=job.seed), job.plan)
    shadow = attacks.train_surrogate_head(
        initial.head,
        copy.deepcopy(trunk.module),
        initial.tail,
        target.aux,
        target.aux_y,
        epochs=settings.attack_epochs,
        seed=job.seed,
    )
    decoder = attacks.train_inversion(
        shadow, target.aux, noise=_noise_std(job), epochs=settings.attack_epochs, seed=job.seed
    )
    result.surrogate_gain = measures.reconstruction_gain(attacks.invert(decoder, h), x, guess)
    images = x.dim() == 4
    few = min(len(h), UNSPLIT_IMAGES if images else UNSPLIT_RECORDS)
    steps = UNSPLIT_STEPS_IMAGES if images else UNSPLIT_STEPS
    fresh = split_model(job.plan.model.build(seed=job.seed), job.plan).head
    guessed = attacks.unsplit(fresh, h[:few], guess, steps=steps, seed=job.seed)
    result.unsplit_gain = measures.reconstruction_gain(guessed, x[:few], guess)


def _noise_std(job: JobConfig) -> float:
    """The standard deviation of the job's activation noise (sigma x the clip bound)."""
    defenses = job.defenses
    return defenses.activation_noise * (defenses.activation_clip or 1.0)


def _plaintext_segments(target: _Target, round: int) -> dict[str, torch.Tensor] | None:
    """The head (and tail) the white-box attacks use: what the aggregator received when the
    segments travel in plaintext; with sealed segments (the default) the aggregator cannot read
    them, and the white-box row answers "what if they travelled in plaintext", from the site's
    own final layers."""
    weights = target.tap.weights(TARGET, round)
    if weights is not None and SEAL not in weights:
        return weights
    segments = target.outcome.agents[TARGET].segments
    return None if segments is None else segments.state()


def _label_attacks(
    target: _Target,
    h: torch.Tensor,
    labels: torch.Tensor,
    batches: list[torch.Tensor],
    tail: nn.Sequential | None,
) -> dict[str, float]:
    """Norm and cosine attacks per batch (mean AUC over batches with both classes), and the
    model-completion attack over every activation ``h`` sent (with their ``labels``)."""
    last = target.job.rounds.count - 1
    norm, cosine = [], []
    for message in target.tap.messages(TARGET, Kind.TRUNK_GRAD, last):
        g, y = message.tensors["g"].float(), target.site.y_train[batches[message.step]]
        positives = torch.nonzero(y == 1).flatten()
        if not 0 < len(positives) < len(y):  # one class only: nothing to separate
            continue
        norm.append(measures.auc(attacks.norm_scores(g), y))
        reference = int(positives[0])  # the one label the attacker knows
        others = torch.arange(len(y)) != reference
        cosine.append(measures.auc(attacks.cosine_scores(g, reference)[others], y[others]))
    leak = {"norm": measures.mean_leak(norm), "cosine": measures.mean_leak(cosine)}
    trunk = target.outcome.coordinator.trunk
    if trunk is None:
        return leak
    if tail is not None:  # white-box: only if the tail travelled in plaintext
        scores = attacks.completion_scores(trunk.module, tail, h)
        leak["completion (plaintext tail)"] = measures.leak_auc(scores.numpy(), labels.numpy())
    with torch.no_grad():  # what the aggregator computes for every batch: the trunk's output
        outputs = trunk.module.eval()(h)
    for known in KNOWN_LABELS:
        found = attacks.known_label_completion(outputs, labels, known, target.job.seed)
        if found is not None:
            scored, truth = found
            leak[f"completion, {known} known"] = measures.leak_auc(scored.numpy(), truth.numpy())
    return leak


def _attack_update(result: Measured, target: _Target) -> None:
    """Federated: invert the site's first update by gradient matching over its whole round,
    and the first layer alone when it is fully connected."""
    _gradient_matching(result, target)
    job, site, aux = target.job, target.site, target.aux
    after = target.tap.weights(TARGET, 0)
    model = job.plan.model.build(seed=job.seed)  # the weights the aggregator sent in round 0
    first = next((m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)), None)
    name = next((n for n, m in model.named_modules() if m is first), "")
    if after is None:
        result.note = "the tap holds no first-round update"
        return
    if not isinstance(first, nn.Linear) or first.bias is None:
        result.note = (
            "first layer is not fully connected with a bias (e.g. a convolution, whose update "
            "mixes every patch of every image): the bias trick does not apply"
        )
        return
    before = model.state_dict()
    weight, bias = f"{name}.weight", f"{name}.bias"
    if weight not in after or bias not in after:
        result.note = "the first layer is private: its update never leaves the site"
        return
    candidates = attacks.first_layer_inversion(before, after, weight, bias)
    guess = aux.mean(0)
    result.update_gain = _closest_record_gain(candidates, site.x_train, guess)
    decoys = aux[torch.randperm(len(aux), generator=torch.Generator().manual_seed(job.seed))]
    result.update_baseline = _closest_record_gain(decoys[: len(candidates)], site.x_train, guess)


def _gradient_matching(result: Measured, target: _Target) -> None:
    """Geiping et al.'s inversion of the first-round update: the aggregator knows the weights
    it sent, the optimizer, the batch order (seed) and the sample count the site declared."""
    job, site, aux = target.job, target.site, target.aux
    after = target.tap.weights(TARGET, 0)
    if after is None:
        return
    model = job.plan.model.build(seed=job.seed)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    samples = site.train_samples  # as declared in its hello
    epochs = job.training.local_epochs
    batches = [
        batch
        for epoch in range(epochs)
        for batch in batch_order(samples, job.training.batch_size, seed=job.seed, epoch=epoch)
    ]
    classes = int(model(aux[:1]).shape[-1])
    steps = GEIPING_STEPS if aux.dim() == 2 else GEIPING_STEPS_IMAGES
    guess = attacks.geiping_inversion(
        model,
        before,
        dict(after),
        samples=samples,
        batches=batches,
        optimizer=job.training.optimizer,
        classes=classes,
        start=aux.mean(0, keepdim=True),
        iterations=steps,
        seed=job.seed,
    )
    result.geiping_gain = _closest_record_gain(
        guess.flatten(1), site.x_train.flatten(1), aux.mean(0).flatten()
    )
    decoys = aux[torch.randperm(len(aux), generator=torch.Generator().manual_seed(job.seed))]
    result.update_baseline = _closest_record_gain(
        decoys[:samples].flatten(1), site.x_train.flatten(1), aux.mean(0).flatten()
    )


def _closest_record_gain(
    candidates: torch.Tensor, records: torch.Tensor, guess: torch.Tensor
) -> float:
    """Median over candidates of the best reconstruction gain any one record gives it: how
    close the attacker's typical guess comes to some real patient (a median, because a neuron
    whose bias barely moved yields a candidate of enormous norm)."""
    if len(candidates) == 0:
        return math.nan
    errors = torch.cdist(candidates.double(), records.double()) ** 2
    baseline = ((records.double() - guess.double()) ** 2).sum(1)
    return float((1 - errors / baseline[None, :]).max(dim=1).values.median())
