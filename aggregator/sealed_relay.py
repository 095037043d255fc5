"""The aggregator's part in sealed split jobs: relay the sites' seals, read none of them.

In a sealed job (``seal_segments``, split modes) the global "weights" the job state holds are
not weights but ``seals``: the bundle of seals the last training turn produced. ``SealedRelay``
wraps the job's strategy so that a turn's outcome is that bundle -- the one seal of the site
that trained (sequential), or every answering site's seal (parallel; the sites combine them
themselves) -- and a turn nobody answered leaves it as it was.

Before a seal is kept it is checked against what the aggregator knows without opening it
(``check_seal``): its sender signed it (roster), it is the answering site's, of this job, round
and turn, and it bounds the same sample count as the ``done`` it came in. Anything else is
refused like any unusable answer, and the job goes on from the seals it already holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from aggregator.strategy import Metrics, Reply, Strategy, check_samples
from medsplit.protocol.spec import SEAL, SEALS
from medsplit.security.seal import Roster, SealError, bundle, unbundle, verify_sender


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().numpy().tobytes()


def no_seals() -> dict[str, torch.Tensor]:
    """The job's state before any turn: an empty bundle (sites start from the initial weights)."""
    return {SEALS: as_tensor(bundle([]))}


def check_seal(
    seal: torch.Tensor,
    roster: Roster,
    *,
    site: str,
    job_id: str,
    round: int,
    turn: int,
    samples: int,
) -> None:
    """Raise ``SealError`` unless ``seal`` is ``site``'s, for this place, with ``samples``."""
    header = verify_sender(as_bytes(seal), roster)
    if header.sender != site:
        raise SealError(f"{site} answered with {header.describe()}")
    if header.job_id != job_id:
        raise SealError(f"{header.describe()} belongs to job {header.job_id!r}, not {job_id!r}")
    if (header.round, header.turn) != (round, turn):
        raise SealError(f"{header.describe()} answers round {round} turn {turn}")
    if header.samples != samples:
        raise SealError(
            f"{header.describe()} bounds {header.samples} samples, but its done says {samples}"
        )


def seal_refusal(
    done: Mapping[str, torch.Tensor], roster: Roster, *, site: str, job_id: str, **place: int
) -> str | None:
    """Why the seal a ``done`` carries is refused (``check_seal``), or None if it is good."""
    try:
        check_seal(done[SEAL], roster, site=site, job_id=job_id, **place)
    except SealError as exc:
        return str(exc)
    return None


def relayed_senders(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Whose seals a job state holds (for logs and tests); never opens them."""
    from medsplit.security.seal import read_header  # noqa: PLC0415

    return [read_header(blob).sender for blob in unbundle(as_bytes(state[SEALS]))]


@dataclass(frozen=True)
class SealedRelay:
    """The job's strategy, with seals in place of weights."""

    base: Strategy

    def configure_train(self, round: int, turn: int, sites: Sequence[str]) -> list[str]:
        return self.base.configure_train(round, turn, sites)

    def check_reply(self, current: Mapping[str, torch.Tensor], reply: Reply) -> None:
        check_samples(reply)
        if set(reply.state) != {SEAL}:
            raise ValueError(f"site {reply.site} sent {sorted(reply.state)[:3]}, not its seal")

    def aggregate_train(
        self,
        current: Mapping[str, torch.Tensor],
        replies: Sequence[Reply],
        failures: Sequence[str] = (),
    ) -> dict[str, torch.Tensor]:
        if not replies:  # nobody answered: the next turn starts where this one would have
            return dict(current)
        for reply in replies:
            self.check_reply(current, reply)
        return {SEALS: as_tensor(bundle(as_bytes(r.state[SEAL]) for r in replies))}

    def configure_evaluate(self, round: int, sites: Sequence[str]) -> list[str]:
        return self.base.configure_evaluate(round, sites)

    def aggregate_evaluate(
        self, metrics: Mapping[str, Metrics], failures: Sequence[str]
    ) -> dict[str, float | None]:
        return self.base.aggregate_evaluate(metrics, failures)
