"""Create the gateway's topics with their partition counts, retention and cleanup policies.

Run where the gateway runs (the image ships this file as /app/scripts/create_topics.py):
the Kubernetes Job `gateway-topics`, compose's one-shot `topics` service, or by hand:

    python create_topics.py [--replication-factor N] [--grow]

It reads the gateway's own settings (`GATEWAY_KAFKA__BOOTSTRAP_SERVERS`,
`GATEWAY_KAFKA__PARTITIONS`, `GATEWAY_TOPICS__*`, `GATEWAY_MAX_DELAY_S`), so the names
and the partition count are the ones the replicas use. Idempotent: a missing topic is
created; an existing one is left as it is and compared with the plan. Exit 1 when the
cluster cannot serve the gateway correctly: `jobs.control` not compacted (a pause older
than the retention would be forgotten), or an input topic with fewer partitions than
`GATEWAY_KAFKA__PARTITIONS` (`--grow` adds them; Kafka can only add partitions).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from gateway.settings import Settings

_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS
# Kafka's error code for a topic created between our listing and our request.
_TOPIC_ALREADY_EXISTS = 36


@dataclass(frozen=True)
class TopicPlan:
    """One topic as the gateway needs it."""

    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)
    # Read by the consumer group (jobs, retry, deferred): partitions bound the replicas.
    grouped: bool = False


def plan(settings: Settings, replication_factor: int) -> list[TopicPlan]:
    """Every contract topic with its partitions and configs.

    - `jobs`, `jobs.retry`, `jobs.deferred`: the consumer group's input, one partition
      per replica at most; retry and deferral records wait up to `GATEWAY_MAX_DELAY_S`
      (uncommitted), so they are kept at least twice that.
    - `jobs.results` (idempotency and GET read it from the start) 7 days, `jobs.status`
      3 days (each API process reads it whole before it serves).
    - `jobs.control`: compacted, never deleted by time: it holds every pause, cancel and
      redrive mark as each subject's latest record.
    - `jobs.dlq`: 30 days for operators to browse and redrive.
    """
    topics = settings.topics
    count = settings.kafka.partitions
    durable = {"min.insync.replicas": "2"} if replication_factor >= 3 else {}
    delayed_ms = max(7 * _DAY_MS, int(2 * settings.max_delay_s * 1000))

    def timed(retention_ms: int) -> dict[str, str]:
        return {"cleanup.policy": "delete", "retention.ms": str(retention_ms), **durable}

    return [
        TopicPlan(topics.jobs, count, timed(7 * _DAY_MS), grouped=True),
        TopicPlan(topics.retry, count, timed(delayed_ms), grouped=True),
        TopicPlan(topics.deferred, count, timed(delayed_ms), grouped=True),
        TopicPlan(topics.results, count, timed(7 * _DAY_MS)),
        TopicPlan(topics.status, count, timed(3 * _DAY_MS)),
        TopicPlan(topics.control, count, {"cleanup.policy": "compact", **durable}),
        TopicPlan(topics.dlq, count, timed(30 * _DAY_MS)),
    ]


@dataclass
class Report:
    """What was found and done; `problems` make the exit code 1."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _entries(response: Any) -> dict[str, dict[str, str]]:
    """Topic name -> {config: value} from DescribeConfigs responses."""
    found: dict[str, dict[str, str]] = {}
    for answer in response:
        for resource in answer.to_object()["resources"]:
            entries = resource.get("config_entries") or []
            found[resource["resource_name"]] = {
                str(e.get("config_names", e.get("config_name"))): str(e.get("config_value"))
                for e in entries
            }
    return found


def compare(
    wanted: TopicPlan, partitions: int, configs: dict[str, str] | None, report: Report
) -> None:
    """Differences between an existing topic and its plan, into `report`."""
    if partitions < wanted.partitions:
        message = (
            f"{wanted.name}: {partitions} partitions, GATEWAY_KAFKA__PARTITIONS says "
            f"{wanted.partitions}"
        )
        if wanted.grouped:
            report.problems.append(f"{message} (run with --grow to add them)")
        else:
            report.lines.append(f"note: {message}")
    elif partitions > wanted.partitions:
        report.lines.append(
            f"note: {wanted.name} has {partitions} partitions: set GATEWAY_KAFKA__PARTITIONS "
            f"to match the jobs topic"
        )
    if configs is None:
        report.lines.append(f"note: {wanted.name}: the broker did not describe its configs")
        return
    policy = configs.get("cleanup.policy", "delete")
    if wanted.configs.get("cleanup.policy") == "compact" and "compact" not in policy:
        report.problems.append(
            f"{wanted.name}: cleanup.policy is {policy!r}, must be 'compact' "
            f"(kafka-configs.sh --alter --entity-type topics --entity-name {wanted.name} "
            f"--add-config cleanup.policy=compact)"
        )
    for key, value in sorted(wanted.configs.items()):
        if key != "cleanup.policy" and key in configs and configs[key] != value:
            report.lines.append(f"note: {wanted.name}: {key}={configs[key]} (plan: {value})")


async def apply(settings: Settings, replication_factor: int, *, grow: bool = False) -> Report:
    """Create what is missing, compare what exists; never deletes or shrinks anything."""
    report = Report()
    wanted = plan(settings, replication_factor)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        request_timeout_ms=settings.kafka.request_timeout_ms,
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            answer = await admin.create_topics(
                [
                    NewTopic(t.name, t.partitions, replication_factor, topic_configs=t.configs)
                    for t in missing
                ]
            )
            for error in answer.to_object()["topic_errors"]:
                code, name = error["error_code"], error["topic"]
                if code == 0:
                    report.lines.append(f"created {name}")
                elif code == _TOPIC_ALREADY_EXISTS:
                    report.lines.append(f"{name}: created meanwhile by someone else")
                else:
                    report.problems.append(f"{name}: not created ({code} {error['error_message']})")
        present = [t for t in wanted if t.name in existing]
        if present:
            described = {
                d["topic"]: len(d["partitions"])
                for d in await admin.describe_topics([t.name for t in present])
            }
            try:
                configs: dict[str, dict[str, str]] | None = _entries(
                    await admin.describe_configs(
                        [ConfigResource(ConfigResourceType.TOPIC, t.name) for t in present]
                    )
                )
            except Exception as exc:  # noqa: BLE001  # a broker that cannot describe configs
                report.lines.append(f"note: describe_configs failed ({type(exc).__name__})")
                configs = None
            grown: dict[str, NewPartitions] = {}
            for topic in present:
                count = described.get(topic.name, 0)
                if grow and topic.grouped and count < topic.partitions:
                    grown[topic.name] = NewPartitions(total_count=topic.partitions)
                    count = topic.partitions
                compare(topic, count, None if configs is None else configs.get(topic.name), report)
                report.lines.append(f"exists {topic.name} ({count} partitions)")
            if grown:
                await admin.create_partitions(grown)
                report.lines.extend(f"grew {name} to {p.total_count}" for name, p in grown.items())
    finally:
        await admin.close()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--replication-factor",
        type=int,
        default=3,
        help="replicas of each partition (1 for a single-broker dev cluster)",
    )
    parser.add_argument(
        "--grow",
        action="store_true",
        help="add partitions to jobs, jobs.retry and jobs.deferred up to GATEWAY_KAFKA__PARTITIONS",
    )
    args = parser.parse_args(argv)
    settings = Settings()
    report = asyncio.run(apply(settings, args.replication_factor, grow=args.grow))
    for line in report.lines:
        print(line)
    for problem in report.problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
