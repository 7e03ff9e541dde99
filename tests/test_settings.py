"""Settings handed to a child process come back the same there."""

from __future__ import annotations

import pytest

from gateway.settings import Settings, child_env, load_settings


def test_child_env_reproduces_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    parent = load_settings(
        kafka={"bootstrap_servers": "127.0.0.1:1", "partitions": 3},
        vault={"token": "s3cr3t-token", "enabled": False},
        flows=("pkg.mod:flow", "other:flow"),
        max_buffered=7,
        tenants_dir="/x/tenants",
    )
    monkeypatch.setenv("GATEWAY_MAX_INFLIGHT", "1")  # the parent's own: not inherited
    env = child_env(parent, {"GATEWAY_LOG_LEVEL": "WARNING"})
    for name in list(env):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    child = Settings(_env_file=None)  # type: ignore[call-arg]
    assert child.log_level == "WARNING"
    assert child.model_dump(exclude={"replica", "log_level"}) == parent.model_dump(
        exclude={"replica", "log_level"}
    )
    assert child.vault.token is not None
    assert child.vault.token.get_secret_value() == "s3cr3t-token"
    assert "GATEWAY_REPLICA" not in env  # each process names itself
