"""Helpers for pipeline tests: real worker processes, publishing and collecting topics."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, TopicPartition

from schemas import Codec
from streams import rowblock
from streams.processor import account_from_bytes

REPO = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """``riskpipe worker`` in a subprocess with the test's settings."""

    def __init__(self, settings, name="w1", extra_env=None):
        self.s = settings
        self.name = name
        self.log_path = Path(settings.data_dir) / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, RISKPIPE_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
                        RISKPIPE_TOPIC_PREFIX=settings.topic_prefix,
                        RISKPIPE_APP_ID=settings.app_id, RISKPIPE_PARTITIONS=str(
                            settings.partitions),
                        RISKPIPE_DATA_DIR=str(Path(settings.data_dir) / name),
                        RISKPIPE_WEB_PORT="0", RISKPIPE_COALESCE_MS=str(settings.coalesce_ms),
                        RISKPIPE_CLICKHOUSE_DSN=settings.clickhouse_dsn.replace(
                            "clickhouse", f"clickhouse-{name}")
                        if settings.clickhouse_dsn.startswith("chdb") else
                        settings.clickhouse_dsn)
        self.env.update(extra_env or {})
        self.env.pop("RISKPIPE_TEST_KAFKA", None)
        self.proc = None

    def start(self, wait_ready=True, timeout=90):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"],
                                     cwd=REPO, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_for("reference data loaded", timeout)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text, timeout=60, count=1):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.log().count(text) >= count:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited ({self.proc.returncode}):\n"
                                     + self.log()[-5000:])
            time.sleep(0.2)
        raise AssertionError(f"worker {self.name}: no {text!r} within {timeout}s:\n"
                             + self.log()[-5000:])

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        assert "Traceback" not in self.log() or "CancelledError" in self.log(), self.log()[-5000:]


def _messages(consumer, seconds):
    """Messages arriving on ``consumer`` within ``seconds``."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        m = consumer.poll(0.1)
        if m is not None and not m.error():
            yield m


class TopicReader:
    """Reads a whole topic from the beginning, decoding Avro values."""

    def __init__(self, settings, topic):
        self.s = settings
        self.topic = settings.topic(topic)
        self.c = Consumer({**settings.kafka_conf(), "group.id": f"reader-{os.urandom(6).hex()}",
                           "auto.offset.reset": "earliest", "enable.auto.commit": False})
        md = self.c.list_topics(self.topic, timeout=10)
        parts = md.topics[self.topic].partitions
        self.c.assign([TopicPartition(self.topic, p, 0) for p in parts])
        self.codec = Codec()
        self.records = []

    def poll(self, seconds=0.5):
        self.records += [self.codec.decode(m.value())[1] for m in _messages(self.c, seconds)]
        return self.records

    def wait(self, pred, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.poll(0.3)
            if pred(self.records):
                return self.records
        raise AssertionError(f"{self.topic}: condition not met within {timeout}s; got "
                             f"{len(self.records)} records: {self.records[-5:]}")

    def close(self):
        self.c.close()


class ChangelogReader:
    """Reads the accounts table changelog (account records keyed by account, as dicts)."""

    def __init__(self, settings):
        self.topic = f"{settings.app_id}-accounts-changelog"
        self.c = Consumer({**settings.kafka_conf(), "group.id": f"cl-{os.urandom(6).hex()}",
                           "auto.offset.reset": "earliest", "enable.auto.commit": False})
        self.c.subscribe([self.topic])
        self.state: dict[str, dict] = {}

    def poll(self, seconds=0.3):
        for m in _messages(self.c, seconds):
            self.state[m.key().decode()] = account_from_bytes(m.value()) if m.value() else None
        return self.state

    def wait_applied(self, account, topic, offset, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            rec = self.poll().get(account)
            if rec and rec["off"].get(topic, -1) >= offset:
                return rec
        raise AssertionError(f"{account}: {topic}@{offset} not applied within {timeout}s")

    def close(self):
        self.c.close()


def free_port() -> int:
    """A free loopback port (for a worker's web endpoints)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sql(port, q):
    """Rows of a query on a running worker's read-only /sql endpoint."""
    url = f"http://127.0.0.1:{port}/sql?q=" + urllib.parse.quote(q)
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())["rows"]


def snapshot_keys(settings):
    """Identity (account, ts, seq, trigger) of every risk-snapshot row on the internal topic."""
    topic = settings.topic("risk-snapshots")
    c = Consumer({**settings.kafka_conf(), "group.id": f"snap-{time.time_ns()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    keys, idle = set(), 0
    while idle < 6:
        m = c.poll(0.25)
        if m is None or m.error():
            idle += 1
            continue
        idle = 0
        cols = rowblock.read(m.value()).get("risk_snapshots")
        if cols:
            keys |= set(zip(cols["account"], np.asarray(cols["ts"]).tolist(),
                            np.asarray(cols["seq"]).tolist(), cols["trigger"]))
    c.close()
    return keys
