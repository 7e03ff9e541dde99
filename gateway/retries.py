"""Retry policy: how many attempts a job gets and how long it waits between them."""

from __future__ import annotations

import random

from gateway.catalog import Tenant
from gateway.envelope import Job
from gateway.settings import RetrySettings

__all__ = ["backoff_s", "max_attempts"]


def max_attempts(job: Job, tenant: Tenant | None, settings: RetrySettings) -> int:
    """The job's own limit, else the tenant's, else the gateway default."""
    if job.max_attempts is not None:
        return job.max_attempts
    if tenant is not None and tenant.jobs.max_attempts is not None:
        return tenant.jobs.max_attempts
    return settings.max_attempts


def backoff_s(failed_attempt: int, settings: RetrySettings, rng: random.Random) -> float:
    """Delay before the attempt after `failed_attempt`: exponential, capped, jittered.

    With jitter j, the delay is drawn uniformly from [(1 - j) * d, d] where
    d = min(cap, base * factor ** (failed_attempt - 1)), so retries of many jobs
    failing together spread out instead of returning in one wave.
    """
    exponent = max(0, failed_attempt - 1)
    try:
        delay = settings.base_s * settings.factor**exponent
    except OverflowError:
        delay = settings.cap_s
    delay = min(settings.cap_s, delay)
    return delay * (1.0 - settings.jitter * rng.random())
