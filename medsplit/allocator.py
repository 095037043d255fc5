"""glibc's allocator, kept from handing megabyte buffers back to the kernel after every message.

Every message allocates buffers of hundreds of kilobytes: the frames, paho's packet copy of
each, the socket reads, the tensors they decode into. glibc serves a request over its mmap
threshold (128 KiB at start, moving up to the largest size freed so far) with a fresh mapping
and returns the heap's free top to the kernel past a trim threshold, so such buffers come back
as new pages each time, and the first touch of every page is a page fault: ~0.9 ms/MB here,
thirty times the cost of copying the bytes. Fixing both thresholds keeps freed buffers for the
next message: building 4 MB of frames went from 3.9 ms to 0.2 ms (docs/benchmarks.md,
"transport"). The cost is memory: up to ``TRIM_BYTES`` of freed heap stays with the process.

``tune()`` is called once per process by every ``Endpoint``; ``MEDSPLIT_MALLOC_TUNING=off``
leaves the allocator alone. Elsewhere than glibc (musl, macOS) it does nothing.

What a peer made the process buffer and then abandoned (incomplete messages that timed out or
overflowed their bound) is not traffic that will come again: ``release()`` hands the freed
heap back to the kernel then (``malloc_trim``), so that 480 MB of abandoned chunks leave the
resident size where it was before them instead of 64 MB or more above it
(docs/benchmarks.md, "reassembly memory"). It runs at most once per ``RELEASE_INTERVAL_S``;
``MEDSPLIT_MALLOC_RELEASE=off`` turns it off (to measure what it saves).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
import time

log = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # allocations below come from the reused heap
TRIM_BYTES = 256 * 1024 * 1024  # free heap kept before any is returned to the kernel
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
RELEASE_INTERVAL_S = 1.0
_last_release = -RELEASE_INTERVAL_S


@functools.cache
def tune() -> bool:
    """Set glibc's thresholds once; returns whether the allocator is tuned."""
    return _apply()


def release(*, now: bool = False) -> bool:
    """Return the free heap to the kernel. False when the last release was less than
    ``RELEASE_INTERVAL_S`` ago (unless ``now``): nothing was done, ask again later; True
    otherwise (done, or nothing to do on this platform or with ``MEDSPLIT_MALLOC_RELEASE=off``)."""
    global _last_release  # noqa: PLW0603 - one process-wide rate limit, like the thresholds
    libc = _glibc()
    if libc is None or _off("MEDSPLIT_MALLOC_RELEASE"):  # (off: to measure what it saves)
        return True
    at = time.monotonic()
    if at - _last_release < RELEASE_INTERVAL_S and not now:
        return False
    _last_release = at
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    libc.malloc_trim(0)
    return True


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION") is not None
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except (OSError, ValueError):
        return None
    return libc if glibc and hasattr(libc, "malloc_trim") else None


def _off(variable: str) -> bool:
    return os.environ.get(variable, "on").lower() in {"off", "0", "false", "no"}


def _apply() -> bool:
    if _off("MEDSPLIT_MALLOC_TUNING"):
        return False
    libc = _glibc()  # musl has a mallopt that does nothing
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1)
    ok = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES) == 1) and ok
    if not ok:
        log.debug("glibc refused the allocator thresholds; message buffers will page-fault")
    return ok
