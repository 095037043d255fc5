"""What an honest-but-curious aggregator keeps of the traffic it receives.

The privacy sweep (``experiments.privacy``) attacks exactly what a real aggregator was sent,
never what it could recompute from a site's data: the tap sits in ``Coordinator.handle``, after
the wire checks and the membership checks, and keeps the tensors of the message kinds an
attacker would use -- cut-layer activations (and, in vanilla split, the labels beside them),
the gradients a U-shaped site returns, and every site's weights at the end of a round.

It keeps chosen rounds only (a CXR job sends ~50 MB of activations per round), and a repeated
message (a re-send after a lost answer) replaces its first copy instead of counting twice.
A deployment never taps: only the sweep passes one to the coordinator.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from medsplit.protocol import Kind
from medsplit.wire import Envelope

TAPPED_KINDS = frozenset({Kind.ACTIVATIONS, Kind.TRUNK_GRAD, Kind.DONE})


@dataclass(frozen=True)
class Tapped:
    """One received message: who sent it, when, and its tensors (detached, not copied)."""

    site: str
    kind: str
    round: int
    step: int
    tensors: dict[str, torch.Tensor]


class WireTap:
    def __init__(self, rounds: Collection[int] | None = None) -> None:
        """Keep messages of ``rounds`` only (every round when None)."""
        self.rounds = None if rounds is None else frozenset(rounds)
        self._kept: dict[tuple[str, str, int, int], Tapped] = {}

    def received(self, site: str, env: Envelope) -> None:
        if env.kind not in TAPPED_KINDS or (
            self.rounds is not None and env.round not in self.rounds
        ):
            return
        tensors = {name: t.detach() for name, t in env.tensors.items()}
        self._kept[(site, env.kind, env.round, env.step)] = Tapped(
            site, env.kind, env.round, env.step, tensors
        )

    def messages(self, site: str, kind: str, round: int) -> list[Tapped]:
        """The site's messages of ``kind`` in ``round``, in step order."""
        found = [m for (s, k, r, _), m in self._kept.items() if (s, k, r) == (site, kind, round)]
        return sorted(found, key=lambda m: m.step)

    def weights(self, site: str, round: int) -> dict[str, torch.Tensor] | None:
        """The weights ``site`` sent at the end of ``round`` (its ``done``), if tapped."""
        done = self.messages(site, Kind.DONE, round)
        return done[-1].tensors if done else None

    def sites(self) -> list[str]:
        return sorted({site for site, _, _, _ in self._kept})
