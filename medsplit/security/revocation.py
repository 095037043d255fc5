"""What a running aggregator reads to refuse a revoked identity itself.

The broker enforces a revocation once it reloads its CRL and ACL; until then a revoked site's
open connection still works. The aggregator closes that gap: ``RevocationWatch`` re-reads the
``revocations.json`` that ``medsplit provision --revoke`` writes into the aggregator's kit
whenever the file changes (checked every ``interval_s``), and the coordinator refuses the
identities it names from then on.

A file that disappears or cannot be parsed keeps the last good list (and says so once):
revocation never silently lapses because an operator's copy went wrong.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from medsplit.ids import check_id

log = logging.getLogger(__name__)


class RevocationWatch:
    def __init__(
        self, path: Path, interval_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self.interval_s = interval_s
        self._clock = clock
        self._next_check = float("-inf")
        self._stamp: tuple[int, int] | None = None
        self._complained: str | None = None
        self.identities: frozenset[str] = frozenset()

    def poll(self) -> frozenset[str]:
        """The revoked identities, re-read if the file changed since the last check."""
        now = self._clock()
        if now < self._next_check:
            return self.identities
        self._next_check = now + self.interval_s
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                self.identities = frozenset(read_revocations(self.path))
                self._stamp = stamp
                self._complained = None
        except (OSError, ValueError) as exc:
            if str(exc) != self._complained:
                self._complained = str(exc)
                log.error("%s; the revocations known before stay in force", exc)
        return self.identities


def read_revocations(path: Path) -> list[str]:
    """The identities ``path`` (revocations.json) names; ValueError naming the file if bad."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: revocations file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    identities = data.get("identities") if isinstance(data, dict) else None
    if not isinstance(identities, list) or not all(isinstance(i, str) for i in identities):
        raise ValueError(f'{path}: expected {{"identities": [site ids]}}')
    return [check_id(identity, f"{path}: identity") for identity in identities]
