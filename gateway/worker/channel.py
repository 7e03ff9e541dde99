"""The channel between the gateway process and one of its workers, and every message on it.

Pickles both ways, frames up to `MAX_FRAME`: a worker is the same program as the
gateway process, with the same Vault credentials and the same job code, so neither
side trusts the other less (unlike the API process, which faces the network and whose
messages are checked JSON). The framing, calls and replies are `gateway.channel`'s.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

from gateway.api.channel import ResultReady
from gateway.channel import Call, ChannelError, Codec, Reply, Started, Stop
from gateway.settings import Settings

__all__ = [
    "MAX_FRAME",
    "Drained",
    "FromWorker",
    "Leave",
    "Reload",
    "ToWorker",
    "WorkerInit",
    "codec",
]

# Metric families of a worker with many tenants run to megabytes; nothing is near this.
MAX_FRAME = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class WorkerInit:
    """What a worker starts from: its settings (Vault credentials included) and index."""

    settings: Settings = field(repr=False)
    index: int


@dataclass(frozen=True, slots=True)
class Reload:
    """Read the catalog again now (the gateway process got SIGHUP)."""


@dataclass(frozen=True, slots=True)
class Leave:
    """Every worker has drained: commit and leave the consumer group now."""


@dataclass(frozen=True, slots=True)
class Drained:
    """Stopping as asked, this worker's jobs are over and its outbox settled; it commits
    and leaves the group once told to (`Leave`)."""


# gateway -> worker: also `Call` (a question: `ready`, `metrics` or `tenants`, the ones
# the API process asks the gateway process) and `Stop` (drain and exit, as on SIGTERM),
# from gateway.channel.
ToWorker = WorkerInit | Reload | Leave | Call | Stop
# worker -> gateway: also `Started` (its gateway started), `ResultReady` (a result it
# recorded, for the API process's GET) and `Reply` (to a `Call`).
FromWorker = Started | Drained | ResultReady | Reply


def _encode(message: ToWorker | FromWorker) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _decode(data: bytes) -> ToWorker | FromWorker:
    try:
        message: ToWorker | FromWorker = pickle.loads(data)  # noqa: S301  # see the docstring
    except Exception as exc:  # noqa: BLE001  # unpickling fails in many ways; all mean a bad frame
        raise ChannelError(f"not a pickle: {type(exc).__name__}") from None
    return message


_CODEC = Codec(_encode, _decode, MAX_FRAME)


def codec() -> Codec:
    """How either end of a worker's channel writes and reads (the same both ways)."""
    return _CODEC
