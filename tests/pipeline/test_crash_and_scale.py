"""Faults and scaling with real worker processes on the real broker.

* kill -9 of a worker mid-stream and a restart: the same final account tables and exactly the
  offline replay's margin event ids (re-emitted ids carry identical content, so consumers that
  deduplicate by id see every event once);
* two workers: the partitions are split between them and the results equal a single worker's;
* recovery from the changelog after losing all local state;
* the ClickHouse sink in its own process (``--role sink``) beside a ``--role margin`` worker,
  killed with -9 mid-stream and restarted: every row still stored once.
"""
import os
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from streams.publish import Publisher
from tests.pipeline.harness import (ChangelogReader, TopicReader, WorkerProcess, free_port,
                                    snapshot_keys, sql)
from tests.pipeline.workload import account_events, publish_reference, replay

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ACCOUNTS = 300


def _publish(settings, events, rate=None):
    pub = Publisher(settings)
    for n, (topic, name, rec) in enumerate(events):
        pub.record(topic, name, rec["account"], rec)
        if rate and n % 100 == 99:
            pub.producer.poll(0)
            time.sleep(100 / rate)
    pub.flush()


def _publish_deposits(settings, deposits):
    _publish(settings, deposits)
    cl = ChangelogReader(settings)
    deadline = time.time() + 60
    while time.time() < deadline:
        st = cl.poll(0.3)
        if all(d[2]["account"] in st for d in deposits):
            break
    cl.close()


def _wait_all_applied(settings, expected_proc, timeout=120):
    cl = ChangelogReader(settings)
    want = {a: expected_proc.account_record(a) for a in expected_proc.book.ids}
    deadline = time.time() + timeout
    state = {}
    while time.time() < deadline:
        state = cl.poll(0.5)
        if all(a in state and state[a] and state[a]["seq"] == want[a]["seq"] and
               len(state[a]["off"]) == len(want[a]["off"]) and
               _positions(state[a]) == _positions(want[a]) for a in want):
            break
    cl.close()
    return state, want


def _owned(worker) -> str:
    """The partitions a worker's last sync loaded, as its log prints them."""
    return re.findall(r"for partitions (\[[^\]]*\])", worker.log())[-1]


def _replayed(worker) -> int:
    """Changelog records a worker's bulk replay applied (streams/feed.py), 0 if none."""
    m = re.search(r"replayed (\d+) changelog records in bulk", worker.log())
    return int(m.group(1)) if m else 0


def _positions(rec):
    return sorted((i, round(q, 9), round(c, 6)) for i, q, c in rec["pos"])


def _check(settings, events_expected, proc, state, want):
    for a, rec in want.items():
        got = state.get(a)
        assert got is not None, a
        assert _positions(got) == _positions(rec), a
        assert (got["st"], got["seq"]) == (rec["st"], rec["seq"]), a
    reader = TopicReader(settings, "margin-calls")
    got = reader.wait(lambda r: len({e["event_id"] for e in r}) >= len(events_expected), 60)
    reader.poll(1.0)
    reader.close()
    # per account, new ids reach the topic in sequence order (the reader returns each
    # partition in offset order, and an account's events share its partition)
    last_new: dict[str, int] = {}
    seen: set[str] = set()
    for e in got:
        if e["event_id"] not in seen:
            seen.add(e["event_id"])
            assert e["seq"] > last_new.get(e["account"], 0), e["event_id"]
            last_new[e["account"]] = e["seq"]
    by_id = {}
    for e in got:
        if e["event_id"] in by_id:  # a re-emission after a crash must be identical
            prev = by_id[e["event_id"]]
            assert (prev["state"], prev["equity"], prev["im"]) == (e["state"], e["equity"],
                                                                   e["im"]), e["event_id"]
        by_id[e["event_id"]] = e
    expected = {e["event_id"]: e for e in events_expected}
    assert set(by_id) == set(expected)
    for k, e in expected.items():
        g = by_id[k]
        assert (g["prev_state"], g["state"], g["trigger"]) == (e["prev_state"], e["state"],
                                                               e["trigger"]), k
        for f in ("equity", "im", "mm", "shortfall"):
            assert g[f] == e[f], (k, f)
    return got


def _check_clickhouse(settings, port, events_expected, timeout=60):
    """ClickHouse after FINAL, queried through the worker: every expected margin event and
    every risk snapshot on the internal topic stored once. Returns the two counts."""
    ids = {e["event_id"] for e in events_expected}
    q = "SELECT event_id FROM riskpipe.margin_events FINAL"
    deadline = time.time() + timeout
    while time.time() < deadline and len(sql(port, q)) < len(ids):
        time.sleep(0.5)
    stored = [r[0] for r in sql(port, q)]
    keys = snapshot_keys(settings)
    deadline = time.time() + timeout
    while time.time() < deadline and sql(
            port, "SELECT count() FROM riskpipe.risk_snapshots FINAL")[0][0] < len(keys):
        time.sleep(0.5)
    snaps = sql(port, "SELECT account, toUnixTimestamp64Milli(ts), seq, trigger "
                      "FROM riskpipe.risk_snapshots FINAL")
    assert len(stored) == len(set(stored)) and set(stored) == ids
    assert len(snaps) == len(keys) and {tuple(r) for r in snaps} == keys
    return len(stored), len(snaps)


def test_kill9_mid_stream_and_restart(settings):
    deposits, events = account_events(ACCOUNTS)
    expected, proc = replay(deposits + events)
    assert len(expected) > 100  # the workload produces plenty of transitions
    publish_reference(Publisher(settings))
    w = WorkerProcess(settings).start()
    _publish_deposits(settings, deposits)
    t = threading.Thread(target=_publish, args=(settings, events, 1500))
    t.start()
    cl = ChangelogReader(settings)
    deadline = time.time() + 60
    while time.time() < deadline and sum(1 for r in cl.poll(0.3).values()
                                         if r and r["seq"] > 0) < ACCOUNTS // 3:
        pass
    cl.close()
    w.kill9()
    t.join()
    # restarted on the same host: same embedded ClickHouse directory as the killed worker
    port = free_port()
    w2 = WorkerProcess(settings, name="w1-restarted", extra_env={
        "RISKPIPE_CLICKHOUSE_DSN": w.env["RISKPIPE_CLICKHOUSE_DSN"],
        "RISKPIPE_WEB_PORT": str(port)}).start()
    try:
        state, want = _wait_all_applied(settings, proc)
        got = _check(settings, expected, proc, state, want)
        stored, snaps = _check_clickhouse(settings, port, expected)
    finally:
        w2.stop()
    print(f"margin events expected {len(expected)}, records on topic {len(got)} "
          f"(re-emitted identical after kill -9: {len(got) - len(expected)}); ClickHouse after "
          f"FINAL: {stored} margin events, {snaps} snapshots, none twice")


def test_two_workers_split_partitions_and_match_single_worker(settings):
    deposits, events = account_events(ACCOUNTS, seed=12)
    expected, proc = replay(deposits + events)
    publish_reference(Publisher(settings))
    a = WorkerProcess(settings, name="a").start()
    b = WorkerProcess(settings, name="b").start()
    try:
        _publish_deposits(settings, deposits)
        _publish(settings, events)
        state, want = _wait_all_applied(settings, proc)
        _check(settings, expected, proc, state, want)
        # both workers did part of the work
        for w in (a, b):
            assert "synced" in w.log()
        owned = [_owned(w) for w in (a, b)]
        assert owned[0] != owned[1] and "[]" not in owned, owned
    finally:
        a.stop()
        b.stop()


def test_a_worker_joining_mid_stream_takes_over_partitions_with_their_state(settings):
    """Scale-out with state: a second worker joins after the first has applied half the
    stream, so the partitions it takes over have records in the changelog. It replays them
    (in bulk) and both continue; the outcome is the single offline replay's."""
    deposits, events = account_events(ACCOUNTS, seed=14)
    half = len(events) // 2
    _, proc_half = replay(deposits + events[:half])
    expected, proc = replay(deposits + events)
    publish_reference(Publisher(settings))
    a = WorkerProcess(settings, name="a").start()
    b = None
    try:
        _publish_deposits(settings, deposits)
        _publish(settings, events[:half])
        _wait_all_applied(settings, proc_half)
        b = WorkerProcess(settings, name="b").start()
        _publish(settings, events[half:])
        state, want = _wait_all_applied(settings, proc)
        _check(settings, expected, proc, state, want)
        assert _replayed(b) > 0, b.log()[-2000:]
        owned = [_owned(w) for w in (a, b)]
        assert owned[0] != owned[1] and "[]" not in owned, owned
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_recovery_from_changelog_after_losing_local_state(settings):
    deposits, events = account_events(120, seed=13)
    events = deposits + events
    expected, proc = replay(events)
    publish_reference(Publisher(settings))
    w = WorkerProcess(settings, name="first").start()
    _publish_deposits(settings, deposits)
    _publish(settings, events[len(deposits):])
    _wait_all_applied(settings, proc)
    w.stop()
    # the changelog is compacted: in the long run a restart replays about one record per
    # account (docs/reliability.md, recovery time)
    from confluent_kafka.admin import AdminClient, ConfigResource
    res = ConfigResource(ConfigResource.Type.TOPIC, f"{settings.app_id}-accounts-changelog")
    admin = AdminClient(settings.kafka_conf())
    assert admin.describe_configs([res])[res].result(timeout=10)["cleanup.policy"].value == \
        "compact"
    # a new worker with an empty data directory (name changes the data dir) rebuilds the
    # tables from the changelog and continues: one more deposit per account must margin
    # against the recovered positions, exactly like the offline replay
    more = [("collateral", "CollateralChange", dict(
        change_id=f"{e[2]['account']}-late", account=e[2]["account"], asset="USD",
        amount=100_000.0, kind="DEPOSIT", ts=e[2]["ts"])) for e in events
        if e[2].get("change_id", "").endswith("-d0")]
    expected2, proc2 = replay(events + more)
    port = free_port()
    w2 = WorkerProcess(settings, name="second-empty-disk",
                       extra_env={"RISKPIPE_WEB_PORT": str(port)}).start()
    try:
        assert "Recovery" in w2.log()
        assert "event loop: uvloop.Loop" in w2.log()  # the default loop
        # the changelog went through the bulk replay (streams/feed.py), at least one record
        # per account, and /metrics tells ops how many and how long
        replayed = _replayed(w2)
        assert replayed >= 120, w2.log()[-2000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = dict(line.split(" ", 1) for line in r.read().decode().splitlines()
                           if line and not line.startswith("#"))
        assert metrics["riskpipe_changelog_replayed_records_total"] == str(replayed)
        assert 0 < float(metrics["riskpipe_last_recovery_seconds"]) < 60
        _publish(settings, more)
        state, want = _wait_all_applied(settings, proc2)
        _check(settings, expected2, proc2, state, want)
    finally:
        w2.stop()


def test_sink_process_killed_mid_stream_and_restarted_stores_everything_once(settings):
    """The split deployment: the margin worker never touches ClickHouse, a sink process of its
    own consumer group stores both output topics. A kill -9 of the sink loses nothing: its
    offsets are committed only after the rows are stored, and re-inserted rows collapse."""
    deposits, events = account_events(ACCOUNTS)
    expected, proc = replay(deposits + events)
    publish_reference(Publisher(settings))
    port = free_port()
    sink_env = {"RISKPIPE_ROLE": "sink", "RISKPIPE_WEB_PORT": str(port)}
    sink = WorkerProcess(settings, name="sink", extra_env=sink_env).start(wait_ready=False)
    sink.wait_for("results store ready", 90)
    assert os.getpriority(os.PRIO_PROCESS, sink.proc.pid) == 10  # yields the CPU to margin
    margin = WorkerProcess(settings, name="margin", extra_env={"RISKPIPE_ROLE": "margin"})
    margin.start()
    sink2 = None
    try:
        _publish_deposits(settings, deposits)
        t = threading.Thread(target=_publish, args=(settings, events, 1500))
        t.start()
        deadline = time.time() + 60
        while time.time() < deadline and sql(
                port, "SELECT count() FROM riskpipe.margin_events")[0][0] < len(expected) // 4:
            time.sleep(0.2)
        sink.kill9()
        t.join()
        # the margin worker never opened a store of its own
        assert not Path(margin.env["RISKPIPE_CLICKHOUSE_DSN"].removeprefix("chdb://")).exists()
        sink2 = WorkerProcess(settings, name="sink-restarted", extra_env={
            **sink_env, "RISKPIPE_CLICKHOUSE_DSN": sink.env["RISKPIPE_CLICKHOUSE_DSN"]})
        sink2.start(wait_ready=False).wait_for("results store ready", 90)
        state, want = _wait_all_applied(settings, proc)
        _check(settings, expected, proc, state, want)
        stored, snaps = _check_clickhouse(settings, port, expected)
    finally:
        margin.stop()
        if sink2 is not None:
            sink2.stop()
    print(f"split deployment, sink killed -9 mid-stream: ClickHouse after FINAL {stored} "
          f"margin events, {snaps} snapshots, none twice")


def test_graceful_stop_commits_everything_it_applied(settings):
    """SIGTERM after the input is applied: the group's committed offsets reach the end of both
    account topics, so a rolling restart redoes nothing."""
    from confluent_kafka import Consumer, TopicPartition
    deposits, events = account_events(60)
    publish_reference(Publisher(settings))
    w = WorkerProcess(settings).start()
    _, proc = replay(deposits + events)
    _publish_deposits(settings, deposits)
    _publish(settings, events)
    _wait_all_applied(settings, proc)
    w.stop()
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": settings.app_id,
                  "enable.auto.commit": False})
    try:
        tps = [TopicPartition(settings.topic(t), p) for t in ("trades", "collateral")
               for p in range(settings.partitions)]
        committed = {(tp.topic, tp.partition): tp.offset for tp in c.committed(tps, timeout=30)}
        ends = {(tp.topic, tp.partition): c.get_watermark_offsets(tp, timeout=30)[1]
                for tp in tps}
    finally:
        c.close()
    assert sum(ends.values()) == len(deposits) + len(events)
    busy = {k for k, end in ends.items() if end > 0}  # an empty partition has no commit
    assert len(busy) > len(ends) // 2
    assert {k: committed[k] for k in busy} == {k: ends[k] for k in busy}
