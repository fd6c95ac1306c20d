"""ClickHouse unavailable for 30 s under load: margin events keep flowing to Kafka, the sink
backs off and holds its offsets (backpressure: the rows wait in Kafka), then catches up, and
after FINAL the store holds every margin event and risk snapshot exactly once.

The outage is the sink's fault drill (``RISKPIPE_FAULT_CLICKHOUSE_DOWN_FILE``): while the file
exists every insert fails as a connection error, which is what the HTTP client raises when a
server is down. The embedded store runs inside the worker and cannot be stopped on its own.
"""
import time
import urllib.request

import pytest

from streams.publish import Publisher
from tests.pipeline.harness import (ChangelogReader, TopicReader, WorkerProcess, free_port,
                                    snapshot_keys, sql)
from tests.pipeline.workload import account_events, publish_reference, replay

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ACCOUNTS = 300
OUTAGE_S = 30.0


def _metric(port, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return None


def _publish(settings, events):
    pub = Publisher(settings)
    for topic, name, rec in events:
        pub.record(topic, name, rec["account"], rec)
    pub.flush()


def _wait(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.25)
    raise AssertionError(f"{what} not reached within {timeout}s")


def test_clickhouse_down_30s_margin_events_flow_then_sink_catches_up(settings, tmp_path):
    deposits, events = account_events(ACCOUNTS, seed=21)
    third = len(events) // 3
    before, during, after = events[:third], events[third:2 * third], events[2 * third:]
    expected_all = {e["event_id"] for e in replay(deposits + events)[0]}
    expected_upto_outage = {e["event_id"] for e in replay(deposits + before + during)[0]}
    assert len(expected_upto_outage) > 50 and len(expected_all) > len(expected_upto_outage)

    down = tmp_path / "clickhouse-down"
    port = free_port()
    publish_reference(Publisher(settings))
    # a small sink buffer: the outage's fetches outnumber it, and margin events must still flow
    # (a full sink feed pauses its own partitions, never the consumer's fetch loop)
    w = WorkerProcess(settings, extra_env={"RISKPIPE_FAULT_CLICKHOUSE_DOWN_FILE": str(down),
                                           "RISKPIPE_WEB_PORT": str(port),
                                           "RISKPIPE_SINK_BUFFER": "2"}).start()
    db_events = "SELECT count() FROM riskpipe.margin_events"
    try:
        _publish(settings, deposits)
        cl = ChangelogReader(settings)
        _wait(lambda: len(cl.poll(0.3)) >= ACCOUNTS, 60, "deposits applied")
        cl.close()
        _publish(settings, before)
        _wait(lambda: sql(port, db_events)[0][0] > 0, 60, "first margin events stored")

        # outage: inserts fail, the sink retries with backoff and holds its offsets
        down.touch()
        t_down = time.time()
        time.sleep(2.0)  # let batches in flight settle before taking the baseline
        stored_at_start = sql(port, db_events)[0][0]
        _publish(settings, during)
        reader = TopicReader(settings, "margin-calls")
        reader.wait(lambda r: expected_upto_outage <= {e["event_id"] for e in r},
                    timeout=OUTAGE_S - 5)
        t_flowed = time.time() - t_down
        while time.time() - t_down < OUTAGE_S:
            assert sql(port, db_events)[0][0] == stored_at_start  # nothing gets in
            time.sleep(1.0)
        retries = _metric(port, "riskpipe_sink_retries_total")
        assert retries and retries > 0 and _metric(port, "riskpipe_sink_up") == 0

        # recovery: the sink's next retry succeeds and it drains what Kafka kept
        down.unlink()
        t_up = time.time()
        _wait(lambda: sql(port, db_events + " FINAL")[0][0] >= len(expected_upto_outage),
              60, "catch-up after the outage")
        catch_up = time.time() - t_up
        _publish(settings, after)
        reader.wait(lambda r: expected_all <= {e["event_id"] for e in r}, timeout=60)
        _wait(lambda: sql(port, db_events + " FINAL")[0][0] >= len(expected_all), 60,
              "all margin events stored")
        snap_keys = snapshot_keys(settings)
        _wait(lambda: sql(port, "SELECT count() FROM riskpipe.risk_snapshots FINAL")[0][0]
              >= len(snap_keys), 60, "all risk snapshots stored")

        stored_ids = [r[0] for r in sql(port, "SELECT event_id FROM riskpipe.margin_events "
                                               "FINAL")]
        assert len(stored_ids) == len(set(stored_ids)) and set(stored_ids) == expected_all
        # the deduplication tokens kept even the raw (pre-merge) rows free of duplicates
        assert sql(port, db_events)[0][0] == len(expected_all)
        snaps = sql(port, "SELECT account, toUnixTimestamp64Milli(ts), seq, trigger "
                           "FROM riskpipe.risk_snapshots FINAL")
        assert {tuple(r) for r in snaps} == snap_keys and len(snaps) == len(snap_keys)
        reader.close()
    finally:
        w.stop()
    print(f"outage {OUTAGE_S:.0f}s: margin events for the outage's input on Kafka after "
          f"{t_flowed:.1f}s; {int(retries)} insert retries; store caught up {catch_up:.1f}s "
          f"after recovery; {len(expected_all)} margin events and {len(snap_keys)} snapshots "
          "stored exactly once")
