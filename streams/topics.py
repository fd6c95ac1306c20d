"""Topic layout and idempotent creation (``riskpipe init``).

Account-keyed input topics (trades, collateral) have the same partition count so that all events
of one account land on the same partition number and one worker owns the account. Reference data
(instruments, risk-params) is compacted: the latest record per key is the state. Quotes are keyed
by instrument and compacted as well as time-retained, so a starting worker rebuilds the latest
marks by reading the topic from the beginning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict
    key: str
    value: str


def topic_specs(s: Settings) -> list[TopicSpec]:
    p = s.partitions
    ret = str(s.retention_ms)
    delete = {"cleanup.policy": "delete", "retention.ms": ret}
    compact = {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"}
    return [
        TopicSpec(s.topic("trades"), p, delete, "account", "Trade"),
        TopicSpec(s.topic("collateral"), p, delete, "account", "CollateralChange"),
        TopicSpec(s.topic("quotes"), p, {"cleanup.policy": "compact,delete", "retention.ms": ret},
                  "instrument", "Quote"),
        TopicSpec(s.topic("instruments"), 1, compact, "instrument id", "Instrument"),
        TopicSpec(s.topic("risk-params"), 1, compact, "underlying", "RiskParams"),
        TopicSpec(s.topic("margin-calls"), p, delete, "account", "MarginEvent"),
        TopicSpec(s.topic("risk-snapshots"), p, {"cleanup.policy": "delete",
                                                 "retention.ms": str(24 * 3600 * 1000)},
                  "account", "internal JSON rows for the ClickHouse sink"),
        TopicSpec(s.topic("dead-letters"), 1, {"cleanup.policy": "delete",
                                               "retention.ms": str(30 * 24 * 3600 * 1000)},
                  "source topic", "DeadLetter"),
    ]


def create_topics(s: Settings, timeout: float = 30.0) -> dict[str, str]:
    """Create missing topics; existing ones are left alone (checked for partition count).
    Returns {topic: "created" | "exists"}."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(s.kafka_conf())
    md = admin.list_topics(timeout=timeout)
    out: dict[str, str] = {}
    new = []
    for spec in topic_specs(s):
        t = md.topics.get(spec.name)
        if t is not None and t.error is None:
            if len(t.partitions) != spec.partitions:
                raise RuntimeError(f"topic {spec.name} has {len(t.partitions)} partitions, "
                                   f"expected {spec.partitions}; co-partitioning needs equal "
                                   "counts (recreate it or change RISKPIPE_PARTITIONS)")
            out[spec.name] = "exists"
        else:
            new.append(NewTopic(spec.name, num_partitions=spec.partitions,
                                replication_factor=s.replication_factor, config=spec.config))
    if new:
        for name, fut in admin.create_topics(new, request_timeout=timeout).items():
            try:
                fut.result()
                out[name] = "created"
            except Exception as e:  # a concurrent creator may have won the race
                if "TOPIC_ALREADY_EXISTS" in str(e) or "already exists" in str(e):
                    out[name] = "exists"
                else:
                    raise
    for name, state in out.items():
        log.info("topic %s: %s", name, state)
    return out
