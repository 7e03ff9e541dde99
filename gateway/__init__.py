"""Multi-tenant worker gateway: Kafka jobs, quotas, secrets, one PenguiFlow flow per job."""

__all__ = ["__version__"]

__version__ = "0.1.0"
