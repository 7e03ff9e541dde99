"""Token bucket for a tenant's job-start rate (pure; the caller passes the clock)."""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """`rate` tokens per second up to `burst`; one token starts one job."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    @property
    def rate(self) -> float:
        """Refill rate in tokens per second."""
        return self._rate

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now

    def available(self, now: float) -> float:
        """Tokens available at `now`."""
        self._refill(now)
        return self._tokens

    def try_take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wait_s(self, now: float) -> float:
        """Seconds until one token is available (0 when one is)."""
        self._refill(now)
        if self._tokens >= 1.0:
            return 0.0
        return (1.0 - self._tokens) / self._rate

    def reconfigure(self, rate: float, burst: int, now: float) -> None:
        """Change rate and size, keeping the tokens already earned (capped)."""
        self._refill(now)
        self._rate = rate
        self._burst = float(burst)
        self._tokens = min(self._tokens, self._burst)
