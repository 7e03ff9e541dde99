"""Process-wide settings of the gateway's processes: garbage-collector tuning, keeping
the memory and environment of the processes that hold Vault credentials from other
processes, and children that end with their parent."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import signal

from gateway.settings import Settings

__all__ = ["die_with_parent", "is_dumpable", "make_undumpable", "tune_gc"]

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3


def _prctl(option: int, value: int = 0) -> int | None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0))
    return None


def make_undumpable() -> bool:
    """Linux: mark this process not dumpable, so no other process of the same user (the
    API process facing the network, say) can read its memory or `/proc/<pid>/environ`,
    where the Vault credentials are; False where the platform cannot."""
    return _prctl(_PR_SET_DUMPABLE, 0) == 0


def die_with_parent() -> None:
    """Linux: get SIGTERM when the parent (the gateway process) ends, even before the
    child's channel to it is read (a child also stops when that channel closes)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def is_dumpable() -> bool | None:
    """Whether this process is dumpable (None where the platform cannot tell)."""
    answer = _prctl(_PR_GET_DUMPABLE)
    return None if answer is None or answer < 0 else answer != 0


def tune_gc(settings: Settings) -> None:
    """Collect young garbage less often, and move what start-up built (catalog, modules,
    clients) out of the collector's sight: it lives as long as the process."""
    if settings.gc_threshold:
        # Older generations after 5 and 10 young collections: a generation-1 collection
        # then gathers the survivors of only 5 x 20,000 allocations, so a flood never
        # holds the loop long enough to show in a quiet tenant's latency.
        gc.set_threshold(settings.gc_threshold, 5, 10)
    gc.freeze()
