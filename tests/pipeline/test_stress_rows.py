"""Exchange-wide stress through the real broker and a real worker process: the stress timer's
rows (every 5 s) reach the risk-snapshots topic with the account it holds in every scenario.
The timer queues them and has them acknowledged in the background, like a market tick's
outputs, instead of waiting for the broker while it holds the work lock."""
import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from tests.pipeline.harness import ChangelogReader
from tests.pipeline.test_margin_call_story import T0, start_put_market

pytestmark = pytest.mark.kafka


def _stress_rows(settings, timeout=30.0):
    import time
    topic = settings.topic("risk-snapshots")
    c = Consumer({**settings.kafka_conf(), "group.id": f"stress-{topic}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = c.poll(0.2)
            if m is None or m.error() or not m.value().startswith(b"{"):
                continue  # Native blocks of snapshots and exposures
            rows = orjson.loads(m.value()).get("stress")
            if rows and any(r[7] for r in rows):  # a run after the account was margined
                return rows
        raise AssertionError(f"no stress rows on {topic} within {timeout} s")
    finally:
        c.close()


def test_stress_rows_reach_the_topic(settings):
    pub, q0, w = start_put_market(settings)
    changelog = ChangelogReader(settings)
    try:
        pub.collateral("dep-1", "alice", "USD", 75_000.0, ts=T0)
        pub.flush()
        changelog.wait_applied("alice", settings.topic("collateral"), 0)
        pub.trade("t0", "alice", "BTC-55000-P", -2.0, q0["mark"], ts=T0)
        pub.flush()
        changelog.wait_applied("alice", settings.topic("trades"), 0)
        rows = _stress_rows(settings)
    finally:
        changelog.close()
        w.stop()
    btc = [r for r in rows if r[2] == "BTC"]
    # ts, worker, underlying, scenario, price move, vol shock sign, weight, accounts,
    # accounts negative, uncovered loss: one row per scenario of the grid, alice in each
    assert btc and len({r[3] for r in btc}) == len(btc)
    assert all(r[7] == 1 and r[8] in (0, 1) and r[9] >= 0.0 for r in btc)
    assert min(r[4] for r in btc) < 0 < max(r[4] for r in btc)  # moves both ways
