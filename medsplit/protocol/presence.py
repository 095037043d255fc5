"""Presence: who is connected to a job, as retained JSON on ``.../{party}/presence``.

Presence is not an envelope: it is small, retained by the broker, and written by the broker
itself when a party vanishes (the Last Will), so it travels as a JSON object of its own and
receivers route presence topics away from the envelope decoder.

* A site publishes ``online`` with its *incarnation* (a fresh id each time the agent process
  starts) and its Last Will says ``offline``.
* The aggregator publishes ``online`` with its *epoch* (a fresh id each time it starts) and the
  time it started; its Last Will says ``offline``. Agents re-announce themselves when they see
  a new epoch, and a second aggregator that finds a live epoch for its job refuses to start.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Literal

# "probe": a starting aggregator asking whether the job already has a live one (wiring).
State = Literal["online", "offline", "probe"]
Role = Literal["aggregator", "site"]
MAX_PRESENCE_BYTES = 1024


class PresenceError(ValueError):
    """A presence payload that is not what ``Presence.to_bytes`` writes."""


def new_incarnation() -> str:
    """An id for one run of one process: tells a restart from a repeated message."""
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class Presence:
    party: str
    role: Role
    state: State
    incarnation: str
    since: float  # Unix time the process started

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    def gone(self) -> Presence:
        """The same party's Last Will."""
        return Presence(self.party, self.role, "offline", self.incarnation, self.since)

    @classmethod
    def online(cls, party: str, role: Role, incarnation: str | None = None) -> Presence:
        return cls(party, role, "online", incarnation or new_incarnation(), time.time())

    @classmethod
    def from_bytes(cls, payload: bytes) -> Presence:
        if len(payload) > MAX_PRESENCE_BYTES:
            raise PresenceError(f"presence of {len(payload)} bytes; at most {MAX_PRESENCE_BYTES}")
        try:
            data = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PresenceError(f"presence is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PresenceError("presence must be a JSON object")
        try:
            presence = cls(
                party=str(data["party"]),
                role=data["role"],
                state=data["state"],
                incarnation=str(data["incarnation"]),
                since=float(data["since"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PresenceError(f"presence lacks or mistypes a field: {exc}") from None
        if presence.role not in ("aggregator", "site") or presence.state not in (
            "online",
            "offline",
            "probe",
        ):
            raise PresenceError(f"presence has role {presence.role!r}, state {presence.state!r}")
        return presence

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        who = self.role if self.party == self.role else f"{self.role} {self.party}"
        return f"{who} (incarnation {self.incarnation}, up since {started})"
