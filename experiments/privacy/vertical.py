"""Label leakage in vertical jobs: what the aggregator and the parties without labels learn.

In a vertical job the labels are the label party's secret. Two others see tensors shaped by
them, and the classic attacks on two-party split learning (Li et al., "Label Leakage and
Protection in Two-party Split Learning", ICLR 2022) read the labels off gradients:

* a **party without labels** gets, every step, the gradient of the loss for its own
  activations: per record, its norm (the norm attack) and its direction against a record whose
  label it knows (the cosine attack) separate the classes;
* the **aggregator** gets the same gradients for the merged activations and, with the top at
  the label party, the gradient of the trunk's output (``trunk-grad``) -- or, with the top at
  the aggregator, the labels themselves.

Each attack's leak is the AUC of its scores against the true labels (folded: 0.5 is nothing,
1.0 everything), per batch of the last round, averaged. Measured with no defense and with the
job's default for the label party -- noise on the gradient it returns (``gradient_noise``) --
as ``medsplit privacy`` does for the other modes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from aggregator.wire_tap import WireTap
from edge_agent.agent import Agent
from experiments.doc_sections import write_section
from experiments.inprocess import run_job
from experiments.privacy import attacks
from experiments.privacy.report import DOC
from experiments.runner import CELL_FAILURES, connector_for, run_grid
from experiments.vertical import party_names
from experiments.vertical_experiment import TOPS, VerticalExperiment
from medsplit.privacy import measures
from medsplit.protocol import Kind
from medsplit.storage import atomic_write
from medsplit.training import batch_order
from medsplit.wire import Envelope

log = logging.getLogger(__name__)

DEFENSES = {"none": 0.0, "default": None}  # gradient_noise: off, or the job's default


class RecordingAgent(Agent):
    """An agent that keeps the answers it got in the last round (a curious party's view)."""

    received: list[Envelope]

    def answer_to(self, request: Envelope) -> Envelope:
        reply = super().answer_to(request)
        if not hasattr(self, "received"):
            self.received = []
        self.received.append(reply)
        return reply


@dataclass(frozen=True)
class LeakCell:
    parties: int
    seed: int
    u_shaped: bool
    defense: str

    def label(self) -> str:
        return f"vertical ({TOPS[self.u_shaped]}), {self.parties} parties, {self.defense}"


@dataclass
class LeakResult:
    cell: LeakCell
    status: str = "completed"
    error: str = ""
    accuracy: float | None = None
    leak: dict[str, float] = field(default_factory=dict)  # attacker (attack) -> leak


def run_vertical_privacy(config: VerticalExperiment) -> list[LeakResult]:
    cells = [
        LeakCell(parties, seed, u_shaped, defense)
        for parties in config.parties
        for u_shaped in (True, False)
        for defense in DEFENSES
        for seed in config.seeds
    ]

    def run(cell: LeakCell, url: str, protocol: str) -> LeakResult:
        return _measure(config, cell, url)

    return run_grid(config, cells, run)


def _measure(config: VerticalExperiment, cell: LeakCell, url: str) -> LeakResult:
    result = LeakResult(cell)
    names = party_names(cell.parties)
    noise = DEFENSES[cell.defense]
    job = config.job(cell.parties, cell.seed, cell.u_shaped, url, gradient_noise=noise)
    last = job.rounds.count - 1
    tap = WireTap(rounds={last})
    try:
        tables = config.tables(cell.parties, cell.seed)
        outcome = run_job(
            job, tables, connector_for(job), tap=tap, agent_type=RecordingAgent,
            timeout=config.timeout_s,
        )  # fmt: skip
    except CELL_FAILURES as exc:
        result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
        return result
    result.accuracy = outcome.history[-1].metrics[names[0]]["accuracy"]
    labels = outcome.agents[names[0]].data.y_train
    batches = batch_order(len(labels), job.training.batch_size, seed=job.seed, epoch=last)
    passive = outcome.agents[names[1]]
    assert isinstance(passive, RecordingAgent)
    got = [e for e in passive.received if e.kind == Kind.GRADIENTS and e.round == last]
    result.leak |= _gradient_attacks(f"{names[1]} (no labels)", got, batches, labels)
    if cell.u_shaped:
        tapped = tap.messages(names[0], Kind.TRUNK_GRAD, last)
        result.leak |= _gradient_attacks("aggregator", tapped, batches, labels)
    else:
        result.leak["aggregator (labels sent)"] = 1.0
    return result


class Gradient(Protocol):
    """A step's gradient as an attacker holds it: an envelope received, or one tapped."""

    @property
    def step(self) -> int: ...
    @property
    def tensors(self) -> Mapping[str, torch.Tensor]: ...


def _gradient_attacks(
    attacker: str, messages: Sequence[Gradient], batches: list[torch.Tensor], labels: torch.Tensor
) -> dict[str, float]:
    """The norm and cosine attacks on each step's gradients, averaged over the round."""
    norm, cosine = [], []
    for message in messages:
        g, y = message.tensors["g"].float(), labels[batches[message.step]]
        positives = torch.nonzero(y == 1).flatten()
        if not 0 < len(positives) < len(y):
            continue
        norm.append(measures.auc(attacks.norm_scores(g), y))
        reference = int(positives[0])  # the one label the attacker knows
        others = torch.arange(len(y)) != reference
        cosine.append(measures.auc(attacks.cosine_scores(g, reference)[others], y[others]))
    return {
        f"{attacker}: norm": measures.mean_leak(norm),
        f"{attacker}: cosine": measures.mean_leak(cosine),
    }


def privacy_markdown(results: list[LeakResult], command: str) -> str:
    from experiments.results import Spread  # noqa: PLC0415 -- matplotlib

    attackers = list(dict.fromkeys(a for r in results for a in r.leak))
    lines = [
        f"```bash\n{command}\n```",
        "",
        "| arrangement | parties | defense | accuracy | " + " | ".join(attackers) + " | runs |",
        "|---" * (5 + len(attackers)) + "|",
    ]
    cells = list(dict.fromkeys((r.cell.u_shaped, r.cell.parties, r.cell.defense) for r in results))
    for u_shaped, parties, defense in cells:
        members = [
            r
            for r in results
            if (r.cell.u_shaped, r.cell.parties, r.cell.defense) == (u_shaped, parties, defense)
            and r.status == "completed"
        ]
        accuracy = Spread.of([r.accuracy for r in members]).text()
        leaks = [Spread.of([r.leak.get(a) for r in members]).text(2) for a in attackers]
        lines.append(
            f"| {TOPS[u_shaped]} | {parties} | {defense} | {accuracy} | "
            + " | ".join(leaks)
            + f" | {len(members)} |"
        )
    return "\n".join(lines) + "\n"


def write_vertical_privacy(
    config: VerticalExperiment, results: list[LeakResult], command: str, *, docs: bool = False
) -> str:
    """privacy.md in the output directory; with ``docs``, the table into docs/privacy.md."""
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    path = out / "privacy.md"
    table = privacy_markdown(results, command)
    atomic_write(path, ("# Label leakage\n\n" + table).encode())
    if docs:
        write_section(DOC, config.name, table, header="# Privacy\n", tag="privacy")
    return str(path)
