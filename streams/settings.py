"""One settings object for every entry point (environment variables prefixed ``RISKPIPE_``).

Read once at the entry point and passed down; nothing reads the environment at import time.
Unknown ``RISKPIPE_*`` variables are rejected at start-up so a typo never silently falls back to
a default.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RISKPIPE_", extra="forbid")

    # Kafka
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="bootstrap servers")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = \
        "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    topic_prefix: str = Field("riskpipe.", description="prefix of every topic name")
    partitions: int = Field(4, ge=1, description="partitions of account-keyed topics")
    replication_factor: int = Field(1, ge=1)
    retention_ms: int = Field(7 * 24 * 3600 * 1000, description="retention of event topics")
    schema_registry_url: str | None = Field(None, description="use Confluent wire format")

    # Worker
    app_id: str = Field("riskpipe", description="consumer group / Faust app id")
    data_dir: Path = Field(REPO / ".riskpipe", description="local state, logs, embedded DB")
    store: Literal["memory://"] = Field(
        "memory://", description="Faust table store. Only memory:// for now: account records "
        "are also written from market ticks (outside an agent event), which Faust's RocksDB "
        "store does not allow; durability comes from the changelog either way")
    role: Literal["all", "margin", "sink"] = Field(
        "all", description="what this worker runs: all (account path and ClickHouse sink in "
        "one process), margin (account path; snapshots go to the topic for a sink process) "
        "or sink (only stores margin-calls and risk-snapshots in ClickHouse: its own "
        "consumer group, so it can run in its own process and scale on its own)")
    sink_nice: int = Field(10, ge=0, le=19, description="CPU niceness a sink process (role "
                           "sink) adds to itself: on a host it shares with margin workers, "
                           "the inserts wait for spare CPU instead of delaying margin calls")
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="event loop of a worker's threads (its own and the Kafka "
        "consumer's); asyncio for the standard library's")
    web_port: int = Field(6066, description="worker web port (metrics, SQL endpoint)")
    web_host: str = "127.0.0.1"
    # Why 8,000 and not 2,000: the cap only matters with a backlog (live, a batch holds what
    # arrived while the last one ran: at 10,000 ev/s the bench's records come in some 1,300
    # partition fetches a second, each batch takes what is queued). Draining a backlog, a
    # larger batch touches each account fewer times per event (one changelog record per
    # account per batch) and has fewer units awaiting the broker: the bench's 300,000-event
    # burst at 0.74-1.14 of the in-process yardstick (five runs) instead of 0.51-0.68 (eight;
    # docs/benchmarks.md).
    # Margin events do not depend on it (an account is margined after each of its events).
    batch_max: int = Field(8000, ge=1, description="max account events per micro-batch "
                           "(a batch takes what has arrived, without waiting to fill)")
    outstanding_units: int = Field(4, ge=1, le=64, description="units of work (account "
                                   "batches, market ticks) whose outputs may await the broker "
                                   "at once; offsets are still acked in order (see "
                                   "docs/reliability.md)")
    fetch_max_wait_ms: int = Field(20, ge=1, le=1500, description="longest the broker holds a "
                                   "fetch of the worker's topics waiting for data; while it "
                                   "does, no other partition of that broker is fetched")
    # why gather, and what it saved: streams/feed.py gather_while_flowing
    fetch_gather_ms: int = Field(5, ge=0, le=500, description="while fetches return records, "
                                 "longest the broker gathers the worker's next fetch (up to "
                                 "fetch_gather_bytes) before answering; 0: answer at once")
    fetch_gather_bytes: int = Field(16 << 10, ge=1, le=50 << 20, description="bytes that end "
                                    "a gathering fetch early")
    sink_fetch_max_wait_ms: int = Field(500, ge=1, le=1500, description="the same for a "
                                        "sink process (--role sink), whose batches wait up to "
                                        "sink_batch_ms anyway: polling every 20 ms cost an "
                                        "idle sink and the broker about 3% of a CPU each")
    sink_fetch_min_bytes: int = Field(1 << 20, ge=1, le=50 << 20, description="bytes a "
                                      "sink process's fetch waits for (up to "
                                      "sink_fetch_max_wait_ms) before the broker answers: "
                                      "under load each fetch otherwise returned a message or "
                                      "two, and the fetch round trips were most of the sink's "
                                      "interpreter time")
    prefetch_backoff_ms: int = Field(10, ge=0, le=1000, description="longest the worker's "
                                     "consumer waits for fetched records to be taken before "
                                     "fetching other partitions of the same broker")
    align_max_wait_ms: int = Field(1000, ge=0, le=60_000, description="longest an account "
                                   "record is held back for the other account topic's earlier "
                                   "records (trades and collateral changes are applied in "
                                   "event-time order per partition; see docs/reliability.md)")
    coalesce_ms: int = Field(100, ge=0, description="max staleness of coalesced quotes")
    snapshot_interval_ms: int = Field(1000, ge=0, description="window of periodic risk "
                                      "snapshots: at most one per account per window (windows "
                                      "staggered across accounts); a state change always "
                                      "writes one")

    # Margin states (global; per-underlying parameters come from the risk-params topic)
    warning_level: float = 1.2
    hysteresis: float = 0.05
    liquidation_buffer: float = 0.10

    # ClickHouse
    clickhouse_dsn: str = Field("", description="chdb:///path (embedded) or http(s)://user:pw@"
                                "host:8123/db; default: chdb under data_dir")
    sink_batch_rows: int = Field(1000, ge=1)
    sink_buffer: int = Field(64, ge=2, description="fetches (one per partition and poll) "
                             "queued for each sink agent; when full (ClickHouse down), fetching "
                             "pauses for those partitions only and their records wait in Kafka. "
                             "High enough that a batch fills for sink_batch_ms: each insert "
                             "has a fixed cost")
    sink_buffer_mb: int = Field(64, ge=1, description="the same bound in megabytes of queued "
                                "records (a catch-up fetches large batches)")
    sink_batch_ms: int = Field(1000, ge=1)
    snapshot_ttl_days: int = Field(90, ge=1)
    scenario_pnl: bool = Field(False, description="store per-scenario P&L per account")
    fault_clickhouse_down_file: Path | None = Field(
        None, description="fault drill: while this file exists the sink treats ClickHouse as "
        "unreachable (inserts fail as a connection error and are retried), to rehearse an "
        "outage without stopping the store")

    @model_validator(mode="after")
    def _defaults(self):
        if not self.clickhouse_dsn:
            self.clickhouse_dsn = f"chdb://{(self.data_dir / 'clickhouse').resolve()}"
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_mechanism:
            raise ValueError("RISKPIPE_KAFKA_SASL_MECHANISM is required with SASL protocols")
        return self

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def kafka_conf(self) -> dict:
        """confluent-kafka (librdkafka) connection settings."""
        conf = {"bootstrap.servers": self.kafka_bootstrap,
                "security.protocol": self.kafka_security_protocol}
        if self.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
            conf["sasl.username"] = self.kafka_sasl_username or ""
            conf["sasl.password"] = (self.kafka_sasl_password.get_secret_value()
                                     if self.kafka_sasl_password else "")
        if self.kafka_ssl_cafile:
            conf["ssl.ca.location"] = self.kafka_ssl_cafile
        return conf

    @property
    def clickhouse_dsn_redacted(self) -> str:
        """The DSN without its password, for logs."""
        parts = urlsplit(self.clickhouse_dsn)
        if parts.password:
            netloc = f"{parts.username}:***@{parts.hostname}" + \
                (f":{parts.port}" if parts.port else "")
            return urlunsplit(parts._replace(netloc=netloc))
        return self.clickhouse_dsn


def load_settings(**overrides) -> Settings:
    unknown = [k for k in os.environ if k.startswith("RISKPIPE_")
               and k[len("RISKPIPE_"):].lower() not in Settings.model_fields
               and k != "RISKPIPE_DEBUG" and not k.startswith("RISKPIPE_TEST_")]
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; see README 'Configuration'")
    return Settings(**overrides)
