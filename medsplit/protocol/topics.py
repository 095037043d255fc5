"""MQTT topic names of protocol version 1, built and parsed in one place.

* ``medsplit/v1/{job}/{site}/up/{kind}``    site -> aggregator
* ``medsplit/v1/{job}/{site}/down/{kind}``  aggregator -> one site
* ``medsplit/v1/{job}/all/{kind}``          aggregator -> every site
* ``medsplit/v1/{job}/{party}/presence``    retained JSON (``presence``); the Last Will says
  "offline". ``party`` is a site id or ``aggregator``, a reserved id.

The broker's ACL (see the security design) grants each certificate identity exactly its own
``up`` and ``down`` subtrees, so the *topic* a message arrived on tells who sent it; receivers
check that the envelope's header agrees with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medsplit.ids import AGGREGATOR_ID, BROADCAST_ID, check_id, check_kind

PREFIX = "medsplit/v1"
BROADCAST = BROADCAST_ID
Direction = Literal["up", "down", "all", "presence"]


def up(job: str, site: str, kind: str) -> str:
    return f"{PREFIX}/{check_id(job, 'job')}/{_site(site)}/up/{check_kind(kind)}"


def down(job: str, site: str, kind: str) -> str:
    return f"{PREFIX}/{check_id(job, 'job')}/{_site(site)}/down/{check_kind(kind)}"


def broadcast(job: str, kind: str) -> str:
    return f"{PREFIX}/{check_id(job, 'job')}/{BROADCAST}/{check_kind(kind)}"


def presence(job: str, party: str) -> str:
    """A site's presence, or the aggregator's (``party`` = ``aggregator``)."""
    return f"{PREFIX}/{check_id(job, 'job')}/{_site(party)}/presence"


def aggregator_presence(job: str) -> str:
    return presence(job, AGGREGATOR_ID)


def is_presence(topic: str) -> bool:
    return topic.startswith(PREFIX + "/") and topic.endswith("/presence")


def site_subscriptions(job: str, site: str) -> list[str]:
    """What an edge agent subscribes to: its own downlink, the broadcasts, the aggregator."""
    return [
        f"{PREFIX}/{check_id(job, 'job')}/{_site(site)}/down/+",
        f"{PREFIX}/{job}/{BROADCAST}/+",
        aggregator_presence(job),
    ]


def aggregator_subscriptions(job: str) -> list[str]:
    """What the aggregator subscribes to: every site's uplink and presence."""
    job = check_id(job, "job")
    return [f"{PREFIX}/{job}/+/up/+", f"{PREFIX}/{job}/+/presence"]


@dataclass(frozen=True)
class Route:
    """A parsed topic. ``site`` is None for broadcasts; ``kind`` is None for presence."""

    job: str
    site: str | None
    direction: Direction
    kind: str | None


def parse(topic: str) -> Route:
    """Parse a protocol topic; raises ValueError for anything else."""
    parts = topic.split("/")
    if len(parts) < 4 or "/".join(parts[:2]) != PREFIX:
        raise ValueError(f"topic {topic!r} is not a {PREFIX} topic")
    job = check_id(parts[2], "job")
    rest = parts[3:]
    if len(rest) == 2 and rest[0] == BROADCAST:
        return Route(job, None, "all", check_kind(rest[1]))
    if len(rest) == 2 and rest[1] == "presence":
        return Route(job, _site(rest[0]), "presence", None)
    if len(rest) == 3 and rest[1] in ("up", "down"):
        direction: Direction = "up" if rest[1] == "up" else "down"
        return Route(job, _site(rest[0]), direction, check_kind(rest[2]))
    raise ValueError(
        f"topic {topic!r} does not follow {PREFIX}/{{job}}/{{site}}/(up|down)/{{kind}}"
    )


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest), for the in-memory transport."""
    want, got = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(got) or (level != "+" and level != got[i]):
            return False
    return len(want) == len(got)


def _site(site: str) -> str:
    check_id(site, "site")
    if site == BROADCAST:
        raise ValueError(f"site id {BROADCAST!r} is reserved for broadcasts")
    return site
