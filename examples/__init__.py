"""Example job types for the gateway, loaded with `GATEWAY_FLOWS=examples.webhook,examples.invoice`.

Each module defines `register(types)`; see the README, "Writing a job type".
"""
