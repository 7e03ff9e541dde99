"""One error tree for the gateway; every error says whether retrying can help."""

from __future__ import annotations

__all__ = [
    "CatalogError",
    "ConfigError",
    "GatewayError",
    "JobError",
    "JobTimeout",
    "ProduceError",
    "ReplicaFenced",
    "SecretForbidden",
    "SecretNotFound",
    "SecretsUnavailable",
    "ServiceError",
    "TenantViolation",
]


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""

    retryable: bool = False
    code: str = "gateway_error"


class ConfigError(GatewayError):
    """Settings or environment are unusable; the process cannot start."""

    code = "config_error"


class CatalogError(ConfigError):
    """A tenant file or the quota tiers are invalid; the message names file and field."""

    code = "catalog_error"

    def __init__(self, path: str, field: str, problem: str) -> None:
        self.path = path
        self.field = field
        self.problem = problem
        where = f"{path}: {field}" if field else path
        super().__init__(f"{where}: {problem}")


class ServiceError(GatewayError):
    """A local service (Tansu, OpenBao) could not be started or reached."""

    code = "service_error"


class ProduceError(GatewayError):
    """The broker did not acknowledge a record within its bound."""

    retryable = True
    code = "produce_failed"


class ReplicaFenced(GatewayError):
    """This replica slept through its consumer-group session: others own its partitions."""

    code = "replica_fenced"


class JobError(GatewayError):
    """A job's own failure, raised by flows; `retryable` picks retry or final failure."""

    code = "job_error"
    # False for failures that are not the job's fault (a Vault outage): the retry does
    # not use up one of the job's attempts, so a long outage never fails the job.
    counts_attempt = True

    def __init__(self, message: str, *, retryable: bool = True, code: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        if code is not None:
            self.code = code


class JobTimeout(JobError):
    """A job ran past its deadline."""

    code = "deadline_exceeded"

    def __init__(self, message: str = "job deadline exceeded") -> None:
        super().__init__(message, retryable=True)


class TenantViolation(JobError):
    """A flow emitted a message for another tenant than the job's."""

    code = "tenant_violation"

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class SecretsUnavailable(JobError):
    """Vault could not be reached (or refused the gateway itself): retry, do not count."""

    code = "secrets_unavailable"
    counts_attempt = False

    def __init__(
        self,
        message: str = "secrets are unavailable: Vault did not answer",
        *,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, retryable=True)
        self.retry_after_s = retry_after_s


class SecretForbidden(JobError):
    """Vault refused the tenant's token for the requested path (or the path left the tenant)."""

    code = "secret_forbidden"

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class SecretNotFound(JobError):
    """The tenant's secret path or key does not exist."""

    code = "secret_not_found"

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)
