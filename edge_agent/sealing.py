"""A site's side of sealed segments (``medsplit.security.seal``): open what the aggregator
relays, seal what it hands on.

In a sealed split job every ``train``, ``evaluate`` and ``finish`` carries ``seals``: a bundle
of the seals the last training turn produced (none before the first), which only the job's
sites can open. A site turns it into the head (and tail) weights it starts from:

* **sequential**: the one seal of the site that trained last; its weights are taken as they are;
* **parallel** (SplitFed): one seal per site of the last round, each holding the weights that
  site started from and the weights it ended with; the site combines them with the job's
  ``aggregation`` rule, in the order the bundle lists them, exactly as the aggregator combines
  unsealed ones. Every site therefore ends with the same bytes, and a sealed run with the same
  weights as an unsealed one.

Every seal is checked before anything is loaded: signed by a site on the CA-signed roster,
made for this job, from before the request it came with, sealed to this site. (An older seal
replayed by the aggregator is not refused: a restarted aggregator legitimately goes back to its
checkpoint, and one that wants a site to train from older weights can as well skip turns.) A seal that fails is refused with
one line naming its sender and the reason (``SealError``); the site then trains nothing
rather than silently starting from fresh weights.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric import ec
from safetensors.torch import load, save

from medsplit.aggregation import Aggregation
from medsplit.protocol import JobSpec
from medsplit.security.seal import (
    Roster,
    SealError,
    SealHeader,
    SealKeys,
    ca_public_key,
    open_seal,
    recipients_of,
    seal,
    unbundle,
    verify_roster,
)

START, END = "start/", "end/"


def to_tensor(data: bytes) -> torch.Tensor:
    """Bytes as the 1-D uint8 tensor they travel as."""
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.zeros(0, dtype=torch.uint8)
    )


def to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().numpy().tobytes()


@dataclass(frozen=True)
class Opened:
    """What a relay turned into: the weights to start from, and the seals' newest position."""

    weights: dict[str, torch.Tensor]
    senders: tuple[str, ...]
    newest: tuple[int, int] | None


@dataclass
class SiteSealing:
    """A site's keys, the CA it trusts for the roster, and what it has seen of the job."""

    keys: SealKeys
    trust: ec.EllipticCurvePublicKey  # the key that must have signed the roster (the CA's)
    roster: Roster | None = None
    start_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_files(cls, site: str, key_file: Path, ca_file: Path) -> SiteSealing:
        """The keys in ``key_file`` (seal.key) and the CA certificate in ``ca_file``."""
        return cls(SealKeys.load(site, key_file), ca_public_key(ca_file))

    def accept_roster(self, text: object, job_id: str) -> None:
        """Take the roster the aggregator relays in ``setup``, if the CA signed it for this
        job and it lists this site's own keys."""
        if not isinstance(text, str):
            raise SealError("this job seals segments but its setup carries no roster")
        roster = verify_roster(text, self.trust, job_id)
        own = roster.sites.get(self.keys.site)
        if own is None or not own.same_as(self.keys.public()):
            raise SealError(
                f"the roster does not list {self.keys.site}'s sealing keys as they are in its "
                "seal.key (provisioned for another federation?)"
            )
        self.roster = roster

    def _roster(self) -> Roster:
        if self.roster is None:
            raise SealError("no roster received yet (setup)")
        return self.roster

    # -- what comes in ---------------------------------------------------------------------------

    def open_relay(
        self,
        relay: torch.Tensor,
        spec: JobSpec,
        *,
        before: tuple[int, int],
    ) -> Opened | None:
        """The weights a request's ``seals`` stand for; None for an empty bundle (the job's
        first turn: the site starts from the job's initial weights, as every site does).

        ``before``: seals must be from an earlier (round, turn): the request's own for
        ``train``, the next round's for ``evaluate`` and ``finish``.
        """
        roster = self._roster()
        seals = unbundle(to_bytes(relay))
        if not seals:
            return None
        opened: list[tuple[SealHeader, dict[str, torch.Tensor]]] = []
        for blob in seals:
            header, payload = open_seal(blob, self.keys, roster, spec.job_id)
            self._check_position(header, before)
            opened.append((header, load(payload)))
        newest = max(h.position for h, _ in opened)
        senders = tuple(h.sender for h, _ in opened)
        if spec.orchestration == "sequential":
            if len(opened) != 1:
                raise SealError(f"a sequential turn relays one seal, got {len(opened)} ({senders})")
            return Opened(_strip(opened[0][1], END), senders, newest)
        return Opened(self._combine(opened, spec), senders, newest)

    @staticmethod
    def _check_position(header: SealHeader, before: tuple[int, int]) -> None:
        if header.position >= before:
            raise SealError(
                f"{header.describe()} is not from before round {before[0]} turn {before[1]} "
                "(replayed into another place?)"
            )

    def _combine(
        self, opened: Sequence[tuple[SealHeader, dict[str, torch.Tensor]]], spec: JobSpec
    ) -> dict[str, torch.Tensor]:
        """SplitFed: the peers' heads (and tails) combined as the aggregator would combine them.

        Every seal says which weights its site started from; honest sites started from the same
        ones. Seals that started elsewhere than the majority are left out (a tie goes to the
        group of the earliest seal), so every honest site combines the same seals."""
        starts = [_digest(_strip(state, START)) for _, state in opened]
        counts = Counter(starts)
        chosen = max(counts, key=lambda d: (counts[d], -starts.index(d)))
        kept = [(h, s) for (h, s), d in zip(opened, starts, strict=True) if d == chosen]
        current = _strip(kept[0][1], START)
        ends = [_strip(state, END) for _, state in kept]
        rule = Aggregation(**spec.aggregation.model_dump())
        return rule.combine(current, ends, [float(h.samples) for h, _ in kept])

    # -- what goes out -----------------------------------------------------------------------------

    def remember_start(self, state: Mapping[str, torch.Tensor]) -> None:
        """The weights this turn starts from (a parallel seal carries them)."""
        self.start_state = {k: v.detach().cpu().clone() for k, v in state.items()}

    def seal_state(
        self,
        state: Mapping[str, torch.Tensor],
        spec: JobSpec,
        *,
        round: int,
        turn: int,
        samples: int,
        recipients: Sequence[str],
    ) -> torch.Tensor:
        """This site's trained weights sealed to ``recipients`` (itself included)."""
        roster = self._roster()
        tensors = {END + k: v.detach().cpu().contiguous() for k, v in state.items()}
        if spec.orchestration == "parallel":
            tensors |= {START + k: v.contiguous() for k, v in self.start_state.items()}
        to = recipients_of([*recipients, self.keys.site], roster)
        header = SealHeader(
            spec.job_id, round, turn, self.keys.site, samples, tuple(dict.fromkeys(to))
        )
        return to_tensor(seal(save(tensors), header, self.keys, roster))


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _digest(state: Mapping[str, torch.Tensor]) -> str:
    return hashlib.sha256(save(dict(sorted(state.items())))).hexdigest()
