"""Who the provisioned broker runs as, so that ``mosquitto -c DIR/mosquitto/mosquitto.conf``
starts as the docs say whoever provisioned it.

Started by root, Mosquitto drops to its ``user`` (``mosquitto`` when the option is absent)
*before* it reads its TLS key; ``medsplit provision`` writes ``server.key`` as 0600, so a broker
provisioned and started by root failed at once ("Unable to load server key file ... Permission
denied"), and could not have written its persistence either. So, when root provisions a broker
that runs from the provisioned folder itself (no ``broker_dir``):

* the broker user (``broker_user``, else ``mosquitto``) gets the key and the data folder, and
  the config names it, when that user exists and can enter the folder;
* otherwise the config says ``user root``, which Mosquitto honours by keeping root, and
  provisioning says why and what to do to drop privileges (create the user, or provision into
  a folder it can enter).

A broker provisioned by anyone else runs as that user and reads the files it owns; Mosquitto
changes user only when started as root. Files for elsewhere (``broker_dir``: a container, a
chart) are left to that deployment.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

DEFAULT_USER = "mosquitto"  # what Mosquitto drops to when started as root without ``user``


@dataclass(frozen=True)
class BrokerUser:
    """The ``user`` line to write (None: none needed) and what provisioning should say."""

    name: str | None
    note: str | None = None


def broker_user(configured: str | None, folder: Path, *, in_place: bool) -> BrokerUser:
    """Who the broker in ``folder`` will run as when started as the docs say."""
    if not in_place or os.geteuid() != 0:
        return BrokerUser(configured)
    name = configured or DEFAULT_USER
    if name == "root":
        return BrokerUser("root")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if configured is not None:
            return BrokerUser(name, f"{folder}: the broker user {name!r} does not exist here")
        return BrokerUser(
            "root",
            f"{folder}: Mosquitto runs as root (there is no {name!r} user to drop to; create "
            "it, e.g. `useradd --system mosquitto`, and provision again to drop privileges)",
        )
    blocked = _closed_parent(folder.resolve(), entry.pw_uid)
    if blocked is not None:
        return BrokerUser(
            "root",
            f"{folder}: Mosquitto runs as root, because {name!r} cannot enter {blocked} (mode "
            f"{stat.S_IMODE(blocked.stat().st_mode):o}); provision into a folder it can enter "
            "(e.g. under /srv) to drop privileges",
        )
    _hand_over(folder, entry.pw_uid, entry.pw_gid)
    return BrokerUser(name, f"{folder}: its keys and data/ belong to {name!r}, the broker user")


def _closed_parent(folder: Path, uid: int) -> Path | None:
    """The first folder on the way to ``folder`` that user ``uid`` may not enter."""
    for path in [*reversed(folder.parents), folder]:
        info = path.stat()
        allowed = stat.S_IXUSR if info.st_uid == uid else stat.S_IXOTH
        if not info.st_mode & allowed and not _in_group(info.st_gid, uid, info.st_mode):
            return path
    return None


def _in_group(gid: int, uid: int, mode: int) -> bool:
    """Whether ``uid``'s primary group is ``gid`` and the group may enter."""
    return bool(mode & stat.S_IXGRP) and pwd.getpwuid(uid).pw_gid == gid


def _hand_over(folder: Path, uid: int, gid: int) -> None:
    """The keys and the persistence folder (and what is in it) to the broker user: a hospital
    broker's bridge key too, which Mosquitto reads whenever the link (re)connects."""
    data = folder / "data"
    data.mkdir(exist_ok=True)
    keys = [folder / name for name in ("server.key", "bridge.key") if (folder / name).exists()]
    for path in [*keys, data, *data.iterdir()]:
        os.chown(path, uid, gid)
