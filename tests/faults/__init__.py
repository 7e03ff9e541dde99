"""Fault-injection toolkit for chaos tests: faults between a gateway and its services.

* `FaultProxy`: a loopback TCP proxy, running on its own thread, that resets, refuses,
  black-holes, delays or throttles connections, or answers HTTP requests with an
  error, on command from any thread.
* `ProxiedTansu` / `ProxiedOpenBao`: the real Kafka broker (Tansu) and Vault (OpenBao)
  reachable only through a `FaultProxy`; OpenBao can also be frozen (SIGSTOP).
* `revoke_tenant_tokens`: revoke in Vault every token the gateway minted for a tenant.
* `kafka_brokers`: the brokers a Kafka broker advertises (one raw metadata request).

Import it from tests as `faults` (the tests directory is on `sys.path`), e.g.
`from faults import FaultProxy`.
"""

from .proxy import FaultProxy
from .services import (
    FaultServiceError,
    ProxiedOpenBao,
    ProxiedTansu,
    kafka_brokers,
    revoke_tenant_tokens,
)

__all__ = [
    "FaultProxy",
    "FaultServiceError",
    "ProxiedOpenBao",
    "ProxiedTansu",
    "kafka_brokers",
    "revoke_tenant_tokens",
]
