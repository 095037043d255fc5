"""Identifiers that end up inside MQTT topics and message headers.

Job and site ids become topic levels, so they must never contain ``/``, ``+`` or ``#`` (which
would let one site's messages land in another's topics) nor be empty or huge. One regular
expression, used by the wire header, the topic builders and the configs alike.
"""

from __future__ import annotations

import re

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
KIND_PATTERN = r"^[a-z][a-z0-9_.-]{0,31}$"
# The aggregator's identity (its certificate CN, its presence topic) and the broadcast level.
AGGREGATOR_ID = "aggregator"
BROADCAST_ID = "all"
RESERVED_IDS = frozenset({AGGREGATOR_ID, BROADCAST_ID})
_ID = re.compile(ID_PATTERN)
_KIND = re.compile(KIND_PATTERN)


def check_id(value: str, what: str) -> str:
    """Return ``value`` if it is a valid job or site id, else raise ValueError naming ``what``."""
    if not _ID.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not a valid id: 1-64 characters, letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return value


def check_kind(value: str) -> str:
    if not _KIND.fullmatch(value):
        raise ValueError(
            f"kind {value!r} is not valid: 1-32 lower-case letters, digits, '_', '.', '-', "
            "starting with a letter"
        )
    return value


def check_site_ids(sites: list[str], reserved: frozenset[str] = RESERVED_IDS) -> list[str]:
    """A job's or federation's site list: unique, and none of the ``reserved`` names."""
    repeated = sorted({s for s in sites if sites.count(s) > 1})
    if repeated:
        raise ValueError(f"site ids must be unique; repeated: {', '.join(repeated)}")
    taken = sorted(set(sites) & reserved)
    if taken:
        raise ValueError(f"{', '.join(taken)} is reserved and cannot be a site id")
    return sites
