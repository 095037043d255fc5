"""Giving freed memory back to the operating system after a large drop.

glibc keeps the pages of freed heap blocks for reuse, so a process that buffered hundreds of
megabytes for messages that never completed (a hostile or broken sender, a broker restart)
keeps that resident set after dropping them, and a memory limit (a container's) sees it as
used. ``malloc_trim(0)`` returns them, as Dask's workers do for the same reason
(distributed.worker_memory, "trim_memory"). Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    return trim


def give_back_freed_memory() -> bool:
    """Return freed heap pages to the OS; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
