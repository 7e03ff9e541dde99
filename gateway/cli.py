"""The `gateway` command: run, demo, dev up, tenants, vault bootstrap, and the operators'
commands (tenants pause/resume/list, jobs cancel, dlq list/redrive) over the admin API."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import click

from gateway.catalog import hash_api_key, load_catalog
from gateway.errors import CatalogError, ConfigError, GatewayError
from gateway.flows import load_job_types
from gateway.observability import configure_logging
from gateway.opsclient import OpsClient, OpsError
from gateway.settings import Settings, load_settings, parse_workers

__all__ = ["main"]


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise click.ClickException(f"invalid settings: {exc}") from None


class _Workers(click.ParamType[int]):
    """`--workers`: a whole number of job processes, or `auto` (one per usable core)."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return parse_workers(value)
        except ValueError as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)


@click.group()
def main() -> None:
    """Multi-tenant worker gateway."""


@main.command()
@click.option(
    "--workers",
    type=_Workers(),
    default=None,
    help="job processes on this machine, each a member of the consumer group, behind one "
    "API process: a number, or `auto` for one per core [default: GATEWAY_WORKERS, else 1]",
)
def run(workers: int | None) -> None:
    """Run the service until SIGTERM/SIGINT."""
    from gateway.service import run_gateway  # keep `tenants check` light

    settings = _settings() if workers is None else _settings(workers=workers)
    configure_logging(settings.log_format, settings.log_level, settings.replica)
    try:
        code, failure = asyncio.run(run_gateway(settings))
    except CatalogError as exc:
        raise click.ClickException(str(exc)) from None
    if failure is not None:
        click.echo(f"error: {failure}", err=True)
    sys.exit(code)


@main.group()
def tenants() -> None:
    """Inspect and manage the tenant catalog."""


@tenants.command("check")
def tenants_check() -> None:
    """Validate the catalog and print each tenant's effective quota."""
    settings = _settings()
    try:
        catalog = load_catalog(settings.tenants_dir, settings.policies_dir)
        types = load_job_types(settings.flows)
    except (CatalogError, ConfigError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    problems = []
    for tenant in catalog:
        unknown = sorted(tenant.jobs.allowed_types - set(types))
        if unknown:
            problems.append(f"{tenant.source}: jobs.allowed_types: unknown types {unknown}")
    header = f"{'tenant':<20} {'tier':<11} {'conc':>5} {'rate/s':>8} {'burst':>6} "
    header += f"{'queued':>7} {'weight':>6}  types"
    click.echo(header)
    for tenant in catalog:
        q = tenant.quota
        click.echo(
            f"{tenant.id:<20} {tenant.tier:<11} {q.max_concurrency:>5} {q.rate_per_s:>8g} "
            f"{q.burst:>6} {q.max_queued:>7} {q.weight:>6}  "
            + ",".join(sorted(tenant.jobs.allowed_types))
        )
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"ok: {len(catalog)} tenants")


@tenants.command("new-key")
@click.argument("tenant")
def tenants_new_key(tenant: str) -> None:
    """Print a fresh API key (once) and the hash to add to the tenant's file."""
    key = f"gw_{tenant}_{secrets.token_urlsafe(32)}"
    click.echo(f"api key (shown once): {key}")
    click.echo(f'add to tenants/{tenant}.toml api_keys_sha256: "{hash_api_key(key)}"')


def _ops() -> OpsClient:
    try:
        return OpsClient(_settings().ops)
    except OpsError as exc:
        raise click.ClickException(str(exc)) from None


def _ask(call: Any) -> Any:
    try:
        return call()
    except OpsError as exc:
        raise click.ClickException(str(exc)) from None


def _emit(data: Any, as_json: bool, table: Any) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        table(data)


_JSON = click.option("--json", "as_json", is_flag=True, help="print the API's JSON (for scripts)")


@tenants.command("list")
@_JSON
def tenants_list(as_json: bool) -> None:
    """Each tenant's state and load (who holds the queue), from the admin API."""

    def table(data: Any) -> None:
        click.echo(f"replica {data['replica']}")
        click.echo(
            f"{'tenant':<20} {'state':<7} {'running':>7} {'queued':>7} {'parked':>7} "
            f"{'deferred':>8} {'throttled':>9} {'backlog':>8}   {'cluster run/wait':>16}"
        )
        for row in sorted(data["tenants"], key=lambda r: -int(r.get("backlog", 0))):
            cluster = row.get("cluster") or {}
            everywhere = f"{cluster.get('running', 0)}/{cluster.get('waiting', 0)}"
            click.echo(
                f"{row['tenant']:<20} {row['state']:<7} {row['running']:>7} {row['queued']:>7} "
                f"{row.get('parked', 0):>7} {row['deferred']:>8} {row['throttled']:>9} "
                f"{row.get('backlog', 0):>8}   {everywhere:>16}"
            )

    _emit(_ask(_ops().tenants), as_json, table)


@tenants.command("pause")
@click.argument("tenant")
@_JSON
def tenants_pause(tenant: str, as_json: bool) -> None:
    """Pause a tenant on every replica: it starts nothing new, its jobs wait."""
    answer = _ask(lambda: _ops().set_state(tenant, "pause"))
    _emit(answer, as_json, lambda a: click.echo(f"{a['tenant']}: {a['state']}"))


@tenants.command("resume")
@click.argument("tenant")
@_JSON
def tenants_resume(tenant: str, as_json: bool) -> None:
    """Resume a paused tenant on every replica."""
    answer = _ask(lambda: _ops().set_state(tenant, "resume"))
    _emit(answer, as_json, lambda a: click.echo(f"{a['tenant']}: {a['state']}"))


@main.group()
def jobs() -> None:
    """Operate on jobs (through the admin API)."""


@jobs.command("cancel")
@click.option("--tenant", required=True, help="the tenant whose jobs to cancel")
@click.option("--type", "job_type", default=None, help="only jobs of this type")
@_JSON
def jobs_cancel(tenant: str, job_type: str | None, as_json: bool) -> None:
    """Cancel a tenant's queued, delayed and running jobs (of one type)."""
    answer = _ask(lambda: _ops().cancel_all(tenant, job_type))
    _emit(answer, as_json, lambda a: click.echo(f"cancel requested: {a['requested']} jobs"))


@main.group()
def dlq() -> None:
    """Browse and redrive the dead-letter queue (through the admin API)."""


@dlq.command("list")
@click.option("--tenant", default=None)
@click.option("--reason", default=None)
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--cursor", default=None, help="continue from a previous page")
@_JSON
def dlq_list(
    tenant: str | None, reason: str | None, limit: int, cursor: str | None, as_json: bool
) -> None:
    """One page of DLQ entries (newest cursor printed at the end)."""

    def table(data: Any) -> None:
        click.echo(
            f"{'where':<12} {'tenant':<16} {'job id':<24} {'reason':<22} {'size':>8}  detail"
        )
        for entry in data["entries"]:
            where = f"{entry['partition']}/{entry['offset']}"
            mark = " (redriven)" if entry.get("redriven") else ""
            click.echo(
                f"{where:<12} {entry['tenant'] or '-':<16} {(entry['job_id'] or '-')[:24]:<24} "
                f"{entry['reason']:<22} {entry['size']:>8}  {entry['detail'][:60]}{mark}"
            )
        if data["next_cursor"]:
            click.echo(f"more: --cursor {data['next_cursor']}")

    _emit(_ask(lambda: _ops().dlq_page(tenant, reason, limit, cursor)), as_json, table)


@dlq.command("redrive")
@click.option("--tenant", default=None)
@click.option("--reason", default=None)
@click.option("--id", "ids", multiple=True, help="only these job ids (repeatable)")
@click.option("--max", "most", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--rate", type=float, default=50.0, show_default=True, help="records per second")
@click.option("--dry-run", is_flag=True, help="count what would go back; send nothing")
@_JSON
def dlq_redrive(
    tenant: str | None,
    reason: str | None,
    ids: tuple[str, ...],
    most: int,
    rate: float,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Send matching DLQ records back to `jobs`, paced, each at most once."""
    wanted = {"tenant": tenant, "reason": reason, "ids": list(ids) or None}
    body: dict[str, Any] = {k: v for k, v in wanted.items() if v is not None}
    body.update({"max": most, "rate_per_s": rate, "dry_run": dry_run})

    def table(a: Any) -> None:
        verb = "would redrive" if a["dry_run"] else "redriving"
        click.echo(
            f"matched {a['matched']}, {verb} {a['redriven']} "
            f"(already redriven {a['already_redriven']}, not redrivable {a['not_redrivable']})"
        )

    _emit(_ask(lambda: _ops().redrive(body)), as_json, table)


@main.group()
def vault() -> None:
    """Vault policies, token roles and demo secrets for the catalog."""


@vault.command("bootstrap")
@click.option(
    "--token",
    envvar=["GATEWAY_VAULT__TOKEN", "VAULT_TOKEN", "BAO_TOKEN"],
    help="an administrator's token (env GATEWAY_VAULT__TOKEN, VAULT_TOKEN or BAO_TOKEN)",
)
@click.option("--seed-demo", is_flag=True, help="write example secrets where none exist")
@click.option("--approle", is_flag=True, help="set up AppRole login for the gateway")
def vault_bootstrap(token: str | None, seed_demo: bool, approle: bool) -> None:
    """Apply per-tenant policies and token roles (and the gateway's policy); idempotent."""
    import hvac
    import requests

    from gateway.vault_bootstrap import bootstrap

    settings = _settings()
    if not token:
        raise click.ClickException("an administrator's Vault token is needed (--token)")
    try:
        catalog = load_catalog(settings.tenants_dir, settings.policies_dir)
        client = hvac.Client(url=settings.vault.addr, token=token, timeout=10)
        report = bootstrap(
            client,
            catalog,
            settings=settings.vault,
            policies_dir=settings.policies_dir,
            seed_demo=seed_demo,
            approle=approle,
        )
    except (CatalogError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    except requests.exceptions.RequestException as exc:
        problem = f"Vault at {settings.vault.addr} is unreachable ({type(exc).__name__})"
        raise click.ClickException(problem) from None
    except hvac.exceptions.VaultError as exc:
        raise click.ClickException(f"Vault refused: {type(exc).__name__}") from None
    for line in report.lines():
        click.echo(line)
    if report.approle is not None:
        click.echo(f"export GATEWAY_VAULT__ROLE_ID={report.approle.role_id}")
        click.echo(f"export GATEWAY_VAULT__SECRET_ID={report.approle.secret_id}")
    click.echo(f"ok: {len(catalog)} tenants bootstrapped in {settings.vault.addr}")


@main.group()
def dev() -> None:
    """Local development services."""


@dev.command("up")
@click.option("--log-dir", type=click.Path(path_type=Path), default=Path(".gateway-run"))
def dev_up(log_dir: Path) -> None:
    """Start Tansu and OpenBao, print GATEWAY_* exports, stop them on Ctrl-C."""
    from gateway.dev.services import bootstrap_local, local_services

    settings = _settings()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        catalog = load_catalog(settings.tenants_dir, settings.policies_dir)
        with local_services(log_dir) as services:
            assert services.openbao is not None
            bao = services.openbao
            vault = bootstrap_local(bao.addr, bao.root_token, catalog, settings).vault
            assert vault.role_id is not None
            assert vault.secret_id is not None
            click.echo(f"export GATEWAY_KAFKA__BOOTSTRAP_SERVERS={services.tansu.bootstrap}")
            click.echo("export GATEWAY_KAFKA__FETCH_MAX_WAIT_MS=50")
            click.echo(f"export GATEWAY_VAULT__ADDR={bao.addr}")
            click.echo(f"export GATEWAY_VAULT__ROLE_ID={vault.role_id}")
            click.echo(f"export GATEWAY_VAULT__SECRET_ID={vault.secret_id.get_secret_value()}")
            click.echo(f"# admin (root) token for `gateway vault bootstrap`: {bao.root_token}")
            click.echo(f"# logs in {log_dir}; Ctrl-C stops both services", err=True)
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
    except (GatewayError, CatalogError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--duration", type=float, default=20.0, show_default=True, help="seconds of load")
@click.option("--no-dashboard", is_flag=True, help="plain progress lines instead of a live view")
@click.option("--log-dir", type=click.Path(path_type=Path), default=None)
def demo(duration: float, no_dashboard: bool, log_dir: Path | None) -> None:
    """The whole system on one machine: services, gateway, a mixed workload, a summary."""
    from gateway.dev.demo import run_demo

    settings = _settings()
    directory = log_dir or Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    # The gateway's own log goes to a file, so it does not tear the live view.
    with (directory / "gateway.log").open("a", encoding="utf-8") as log_file:
        configure_logging("json", "INFO", "demo", stream=log_file)
        try:
            ok = asyncio.run(
                run_demo(
                    settings, duration_s=duration, dashboard=not no_dashboard, log_dir=directory
                )
            )
        except GatewayError as exc:
            raise click.ClickException(str(exc)) from None
    sys.exit(0 if ok else 1)
