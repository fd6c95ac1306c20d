"""The feeds between Faust's consumer and the agents: order, batch bounds, pausing a full feed's
partitions and what a revocation drops (the Kafka side is covered by the pipeline tests)."""
import asyncio
from types import SimpleNamespace

from faust.types import TP

from streams.feed import Feed


def _fetch(topic, partition, offsets):
    return {TP(topic, partition): [SimpleNamespace(topic=topic, partition=partition, offset=o)
                                 for o in offsets]}


def _offsets(records):
    return [(r.topic, r.partition, r.offset) for r in records]


def test_take_keeps_partition_order_and_bounds_batches_by_whole_fetches():
    async def run():
        feed = Feed(["t"])
        feed.put(feed.epoch, _fetch("t", 0, range(0, 3)))
        feed.put(feed.epoch, _fetch("t", 1, range(0, 2)))
        feed.put(feed.epoch, _fetch("t", 0, range(3, 7)))
        first = await feed.take(5)   # 3 + 2 fit; the next fetch of 4 would exceed 5
        second = await feed.take(5)
        return first, second
    (e1, b1), (e2, b2) = asyncio.run(run())
    assert e1 == e2 == 0
    assert _offsets(b1) == [("t", 0, 0), ("t", 0, 1), ("t", 0, 2), ("t", 1, 0), ("t", 1, 1)]
    assert _offsets(b2) == [("t", 0, o) for o in range(3, 7)]


def test_a_fetch_larger_than_the_batch_bound_is_still_delivered_whole():
    async def run():
        feed = Feed(["t"])
        feed.put(feed.epoch, _fetch("t", 0, range(10)))
        return await feed.take(3)
    _, batch = asyncio.run(run())
    assert len(batch) == 10


def test_revocation_drops_queued_and_late_fetches_and_bumps_the_epoch():
    async def run():
        feed = Feed(["t"])
        old = feed.epoch
        feed.put(old, _fetch("t", 0, range(3)))
        feed.revoke()
        feed.put(old, _fetch("t", 0, range(3, 5)))   # fetched before the revocation
        feed.put(feed.epoch, _fetch("t", 0, range(0, 2)))  # re-read after the seek
        epoch, batch = await feed.take(100)
        return old, epoch, batch
    old, epoch, batch = asyncio.run(run())
    assert epoch == old + 1
    assert _offsets(batch) == [("t", 0, 0), ("t", 0, 1)]


def test_a_revocation_while_a_batch_fills_waits_for_new_records_instead_of_failing():
    """The sink's take waits up to ``within`` to fill a batch; a rebalance that revokes the
    feed meanwhile empties its queue. The take then waits for records of the new epoch (it
    once popped the empty queue: the sink agent crashed and Faust restarted it)."""
    async def run():
        feed = Feed(["t"])
        feed.put(feed.epoch, _fetch("t", 0, range(3)))
        taking = asyncio.ensure_future(feed.take(100, within=0.3))
        await asyncio.sleep(0.05)
        feed.revoke()
        await asyncio.sleep(0.5)  # past the fill's deadline, nothing queued
        assert not taking.done()
        feed.put(feed.epoch, _fetch("t", 0, range(0, 2)))  # re-read after the seek
        return feed.epoch, await asyncio.wait_for(taking, 5)
    epoch, (got_epoch, batch) = asyncio.run(run())
    assert got_epoch == epoch
    assert _offsets(batch) == [("t", 0, 0), ("t", 0, 1)]


class _Consumer:
    """Records what the feed asks of Faust's consumer (pause / resume partitions)."""

    def __init__(self):
        self.calls = []
        self._buffered_partitions = set()

    def on_buffer_full(self, tp):
        self.calls.append(("pause", tp))
        self._buffered_partitions.add(tp)

    def on_buffer_drop(self, tp):
        self.calls.append(("resume", tp))
        self._buffered_partitions.discard(tp)


def test_a_full_feed_pauses_its_partitions_instead_of_blocking_and_resumes_at_half():
    async def run():
        c = _Consumer()
        feed = Feed(["t"], max_fetches=4)
        for o in range(3):
            feed.put(0, _fetch("t", 0, [o]), c)  # never blocks the fetch loop
        paused_early = list(c.calls)
        feed.put(0, _fetch("t", 1, [0]), c)      # the 4th fetch fills it: pause
        paused = list(c.calls)
        await feed.take(1)                       # 3 left: still above half
        still = list(c.calls)
        await feed.take(1)                       # 2 left: half, resume
        return paused_early, paused, still, c.calls
    paused_early, paused, still, final = asyncio.run(run())
    assert paused_early == []
    assert paused == [("pause", ("t", 1))]
    assert still == paused
    assert final == paused + [("resume", ("t", 1))]


def test_revocation_forgets_paused_partitions_without_resuming_them():
    async def run():
        c = _Consumer()
        feed = Feed(["t"], max_fetches=2)
        feed.put(0, _fetch("t", 0, [0]), c)
        feed.put(0, _fetch("t", 0, [1]), c)
        feed.revoke()
        return c
    c = asyncio.run(run())
    assert c.calls == [("pause", ("t", 0))] and c._buffered_partitions == set()


def test_the_sink_can_wait_for_a_fuller_batch():
    async def run():
        feed = Feed(["t"])
        feed.put(0, _fetch("t", 0, [0]))

        async def later():
            await asyncio.sleep(0.05)
            feed.put(0, _fetch("t", 0, [1, 2]))
        asyncio.ensure_future(later())
        return await feed.take(100, within=0.5)
    _, batch = asyncio.run(run())
    assert _offsets(batch) == [("t", 0, 0), ("t", 0, 1), ("t", 0, 2)]


def test_the_worker_consumer_caps_the_broker_side_fetch_wait():
    """Faust asks the broker to hold a fetch up to 1.5 s; while it does, no other partition of
    that broker is fetched, so the worker's consumer must carry the configured cap instead."""
    import faust

    from streams.feed import install

    async def build():
        app = faust.App("feed-wait-test", broker="kafka://127.0.0.1:1")
        install(app, {"accounts": ["trades"]}, fetch_max_wait_ms=20)
        consumer = app.consumer  # the batch consumer, built by the transport installed above
        thread = consumer._new_consumer_thread()
        return thread._create_worker_consumer(app.transport)

    aio = asyncio.run(build())
    assert aio._fetch_max_wait_ms == 20


def test_the_worker_consumer_caps_the_prefetch_back_off_and_wakes_after_fetches():
    """Records left in the fetcher (the changelog the worker writes but never reads) hold up
    every partition of that broker for the fetcher's back-off: capped at the setting. The
    consumer thread also wraps the fetcher's requests (streams.feed.wake_after_fetch; its
    effect is tested against the real broker in tests/kafka/test_fetch_wake.py)."""
    import faust

    from streams.feed import install

    async def proc_fetch_request(assignment, node_id, request):
        return False

    async def run():
        app = faust.App("feed-backoff-test", broker="kafka://127.0.0.1:1")
        install(app, {"accounts": ["trades"]}, prefetch_backoff_ms=10)
        thread = app.consumer._new_consumer_thread()

        class Started:  # what on_start needs of aiokafka's consumer: start() builds the fetcher
            async def start(self):
                self._fetcher = SimpleNamespace(_prefetch_backoff=0.1,
                                                _proc_fetch_request=proc_fetch_request)

        thread._create_consumer = lambda loop: Started()
        await thread.on_start()
        return thread._consumer._fetcher

    fetcher = asyncio.run(run())
    assert fetcher._prefetch_backoff == 0.01
    assert fetcher._proc_fetch_request is not proc_fetch_request


# -- event-time alignment of the account topics ----------------------------------------------

def _timed(topic, partition, first, stamps):
    """One fetch of ``topic``/``partition``: offsets from ``first``, Kafka timestamps given."""
    return {TP(topic, partition): [
        SimpleNamespace(topic=topic, partition=partition, offset=first + k, timestamp=ts)
        for k, ts in enumerate(stamps)]}


class _Ends(_Consumer):
    """A consumer that knows each assigned partition's end (high watermark) as of its last
    fetch; ``None``: not fetched yet. Unassigned partitions raise, as aiokafka's does."""

    def __init__(self, ends, committed=None):
        super().__init__()
        self.ends = ends
        self._committed_offset = committed or {}

    def highwater(self, tp):
        assert tp in self.ends, "Partition is not assigned"
        return self.ends[tp]


def _stamps(records):
    return [(r.topic, r.offset, r.timestamp) for r in records]


def test_an_aligned_feed_holds_trades_until_earlier_collateral_changes_are_fetched():
    """The trades' partition was fetched first (a backlog); the collateral partition is known
    to hold records not fetched yet. Nothing goes until they arrive, then both merge by event
    time, a deposit before a trade of the same millisecond."""
    async def run():
        c = _Ends({TP("collateral", 0): 3, TP("trades", 0): 4}, committed={})
        feed = Feed(["collateral", "trades"], align=True, align_max_wait_ms=5000)
        feed.put(0, _timed("trades", 0, 0, [10, 20, 30, 40]), c)
        early = asyncio.ensure_future(feed.take(100))
        await asyncio.sleep(0.05)
        held = not early.done()
        feed.put(0, _timed("collateral", 0, 0, [5, 20, 35]), c)
        return held, await early, feed.forced
    held, (_, batch), forced = asyncio.run(run())
    assert held
    assert _stamps(batch) == [("collateral", 0, 5), ("trades", 0, 10), ("collateral", 1, 20),
                              ("trades", 1, 20), ("trades", 2, 30), ("collateral", 2, 35),
                              ("trades", 3, 40)]
    assert forced == 0


def test_a_caught_up_topic_holds_nothing_back():
    """At the live end of the log: the collateral partition's end equals what was received
    (or, before anything was received, the committed offset), so trades go at once."""
    async def run():
        c = _Ends({TP("collateral", 0): 7, TP("trades", 0): 3}, committed={TP("collateral", 0): 7})
        feed = Feed(["collateral", "trades"], align=True, align_max_wait_ms=5000)
        feed.put(0, _timed("trades", 0, 0, [10, 20, 30]), c)
        first = await asyncio.wait_for(feed.take(100), 1)
        feed.put(0, _timed("collateral", 0, 7, [40]), c)
        c.ends[TP("collateral", 0)] = 8
        second = await asyncio.wait_for(feed.take(100), 1)
        feed.put(0, _timed("trades", 0, 3, [50]), c)
        third = await asyncio.wait_for(feed.take(100), 1)
        return first[1], second[1], third[1]
    first, second, third = asyncio.run(run())
    assert [r.offset for r in first] == [0, 1, 2]
    assert _stamps(second) == [("collateral", 7, 40)]
    assert _stamps(third) == [("trades", 3, 50)]


def test_the_wait_for_a_lagging_topic_is_bounded_and_other_partitions_never_wait():
    async def run():
        c = _Ends({TP("collateral", 0): 9, TP("trades", 0): 2,
                   TP("collateral", 1): 0, TP("trades", 1): 1})
        feed = Feed(["collateral", "trades"], align=True, align_max_wait_ms=100)
        feed.put(0, _timed("trades", 0, 0, [10, 20]), c)  # collateral[0] lags, never comes
        feed.put(0, _timed("trades", 1, 0, [15]), c)      # collateral[1] is empty
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        _, first = await feed.take(100)
        t1 = loop.time()
        _, second = await feed.take(100)
        return first, second, t1 - t0, loop.time() - t0, feed.forced
    first, second, t_first, t_second, forced = asyncio.run(run())
    assert _offsets(first) == [("trades", 1, 0)] and t_first < 0.05
    assert _offsets(second) == [("trades", 0, 0), ("trades", 0, 1)]
    assert 0.09 <= t_second < 1.0 and forced == 1


def test_an_aligned_feed_bounds_batches_and_keeps_each_partition_in_offset_order():
    async def run():
        c = _Ends({TP("collateral", p): 50 for p in range(2)} |
                  {TP("trades", p): 50 for p in range(2)})
        feed = Feed(["collateral", "trades"], align=True)
        rng = __import__("random").Random(3)
        for p in range(2):
            for t in ("collateral", "trades"):
                feed.put(0, _timed(t, p, 0, sorted(rng.randrange(1000) for _ in range(50))), c)
        batches = []
        while sum(len(b) for b in batches) < 200:
            batches.append((await asyncio.wait_for(feed.take(30), 1))[1])
        return batches
    batches = asyncio.run(run())
    assert all(len(b) <= 30 for b in batches)
    merged = [r for b in batches for r in b]
    for p in range(2):
        part = [r for r in merged if r.partition == p]
        assert [r.timestamp for r in part] == sorted(r.timestamp for r in part)
        for t in ("collateral", "trades"):
            assert [r.offset for r in part if r.topic == t] == list(range(50))


def test_each_partition_fetch_reports_the_lag_of_its_oldest_record():
    import time as _time
    lags = []
    feed = Feed(["collateral", "trades"], align=True)
    feed.on_fetch = lags.append
    now_ms = int(_time.time() * 1000)
    feed.put(0, {**_timed("trades", 0, 0, [now_ms - 2000, now_ms - 100]),
                 **_timed("trades", 1, 0, [now_ms - 500])})
    assert len(lags) == 2
    assert 1.99 <= lags[0] < 2.5 and 0.49 <= lags[1] < 1.0


def test_a_drained_partition_leaves_no_wait_behind():
    """After a release past the wait bound that empties the partition exactly at the batch
    bound, the next take waits for records instead of waking up again and again."""
    async def run():
        c = _Ends({TP("collateral", 0): 5, TP("trades", 0): 2})
        feed = Feed(["collateral", "trades"], align=True, align_max_wait_ms=30)
        calls = []
        release = feed._release
        feed._release = lambda *a: calls.append(1) or release(*a)
        feed.put(0, _timed("trades", 0, 0, [10, 20]), c)
        _, batch = await feed.take(2)
        n = len(calls)
        with __import__("pytest").raises(asyncio.TimeoutError):
            await asyncio.wait_for(feed.take(2), 0.2)
        return batch, len(calls) - n
    batch, more_calls = asyncio.run(run())
    assert [r.offset for r in batch] == [0, 1]
    assert more_calls <= 2


def test_a_log_emptied_by_retention_counts_as_read_where_the_reset_put_the_consumer():
    """Nothing committed and nothing received, but the consumer's position (after its reset
    to the earliest offset) is already the end: trades do not wait for that partition."""
    async def run():
        c = _Ends({TP("collateral", 0): 500, TP("trades", 0): 1})
        state = SimpleNamespace(position=500, has_valid_position=True)
        assignment = SimpleNamespace(state_value=lambda tp: state)
        c._thread = SimpleNamespace(_consumer=SimpleNamespace(_subscription=SimpleNamespace(
            subscription=SimpleNamespace(assignment=assignment))))
        feed = Feed(["collateral", "trades"], align=True, align_max_wait_ms=5000)
        feed.put(0, _timed("trades", 0, 0, [10]), c)
        return await asyncio.wait_for(feed.take(10), 1)
    _, batch = asyncio.run(run())
    assert _offsets(batch) == [("trades", 0, 0)]


def test_a_feed_bounded_in_bytes_pauses_when_its_records_fill_the_bound():
    """The sink's feeds: many small fetches fit (a batch fills for its time window), while a
    few large ones (a catch-up) fill the byte bound first; taking them resumes at half."""
    def fetch(partition, offset, size):
        return {TP("t", partition): [SimpleNamespace(topic="t", partition=partition,
                                                     offset=offset, value=b"x" * size)]}

    async def run():
        c = _Consumer()
        feed = Feed(["t"], max_fetches=64, max_bytes=1000)
        for o in range(20):
            feed.put(0, fetch(0, o, 10), c)       # 200 bytes in 20 fetches: not full
        small = list(c.calls)
        feed.put(0, fetch(1, 0, 800), c)          # 1,000 bytes: full, pause
        paused = list(c.calls)
        epoch, batch = await feed.take(100)       # everything: resume
        return small, paused, c.calls, batch
    small, paused, final, batch = asyncio.run(run())
    assert small == []
    assert paused == [("pause", ("t", 1))]
    assert final == paused + [("resume", ("t", 1))] and len(batch) == 21


def test_a_sink_process_polls_the_broker_less_often_than_a_margin_worker(tmp_path):
    """A sink process's batches wait up to a second anyway, so its consumer lets the broker
    hold a fetch for 500 ms instead of 20 (an idle sink polling every 20 ms cost it and the
    broker about 3% of a CPU each) until 1 MiB has arrived (under load, each fetch returned a
    message or two); any process with the account path keeps 20 ms and answers at once
    unless records are flowing."""
    from streams.app import Pipeline
    from streams.settings import Settings
    from streams.store import make_sink

    waits = {}
    for role in ("margin", "sink", "all"):
        s = Settings(role=role, data_dir=tmp_path / role,
                     clickhouse_dsn=f"chdb://{tmp_path / role / 'ch'}")
        sink = make_sink(s) if role != "margin" else None
        pipe = Pipeline(s, sink)

        async def consumer_of(app):  # the aiokafka consumer the process would start
            return app.consumer._new_consumer_thread()._create_worker_consumer(app.transport)

        consumer = asyncio.run(consumer_of(pipe.app))
        waits[role] = (consumer._fetch_max_wait_ms, consumer._fetch_min_bytes,
                       pipe.app.transport.gather)
        pipe.out.producer = None  # never started: no client left trying to reach a broker
    # a process with the account path gathers its fetches for 5 ms while records flow
    # (tests/kafka/test_fetch_gather.py); a sink process's fetches always wait to fill
    assert waits == {"margin": (20, 1, (16384, 5)), "sink": (500, 1 << 20, None),
                     "all": (20, 1, (16384, 5))}


def test_a_changelog_replayed_in_bulk_leaves_the_store_as_fausts_own_replay_would():
    """Bulk replay (``replay_changelog``) against Faust's own: its recovery's offset rule (skip
    what is applied) and its memory store's ``apply_changelog_batch`` on the same records, in
    a real Faust app's recovery and tables (not started: no broker is needed for this part;
    the worker's replay through the broker is asserted in test_crash_and_scale)."""
    import faust
    from faust.events import Event
    from faust.types import Message

    from streams.feed import replay_changelog

    app = faust.App("replay-test", broker="kafka://127.0.0.1:1", store="memory://")
    bulk = app.Table("bulk", default=None, partitions=2, key_type=bytes, value_type=bytes)
    ref = app.Table("ref", default=None, partitions=2, key_type=bytes, value_type=bytes)
    topic = bulk.changelog_topic.get_topic_name()
    tp0, tp1 = TP(topic, 0), TP(topic, 1)
    # partition 0: offsets 0-2 were applied before (a rebalance's earlier recovery); their
    # records must not be applied again over what the store holds
    log0 = [(b"a", b"a0"), (b"b", b"b0"), (b"a", None),     # applied before
            (b"a", b"a3"), (b"b", None), (b"c", b"c5"), (b"c", None), (b"c", b"c7")]
    log1 = [(b"d", b"d0"), (b"e", None), (b"d", b"d2"), (b"f", b"f3")]
    for table in (bulk, ref):
        table.data.data[b"b"] = b"b0"
        table.data._key_partition[b"b"] = 0

    def recs(tp, log, start, stop):
        return [SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=o, key=k,
                                value=v) for o, (k, v) in enumerate(log) if start <= o < stop]

    async def run():
        recovery = app.tables.recovery
        recovery.active_tps = {tp0, tp1}
        recovery.active_highwaters.update({tp0: len(log0) - 1, tp1: len(log1) - 1})
        recovery.active_offsets.update({tp0: 2, tp1: -1})
        recovery._set_recovery_started()
        read = {}
        # the first fetch re-delivers offsets 1-2 of partition 0 (at or below the applied)
        n1, end1 = replay_changelog(recovery, {topic: bulk},
                                    {tp0: recs(tp0, log0, 1, 6), tp1: recs(tp1, log1, 0, 2)},
                                    read)
        state1 = (recovery.in_recovery, recovery.signal_recovery_end.is_set())
        n2, end2 = replay_changelog(recovery, {topic: bulk},
                                    {tp0: recs(tp0, log0, 6, 8), tp1: recs(tp1, log1, 2, 4)},
                                    read)
        return (n1, end1, state1, n2, end2, recovery.in_recovery,
                recovery.signal_recovery_end.is_set(), dict(recovery.active_offsets), read)

    n1, end1, state1, n2, end2, in_rec, signalled, offsets, read = asyncio.run(run())
    assert (n1, end1, state1) == (5, False, (True, False))
    assert (n2, end2, in_rec, signalled) == (4, True, False, True)
    assert offsets == {tp0: 7, tp1: 3} and read == {tp0: 7, tp1: 3}

    # Faust's own replay of the same partitions from the same applied offsets
    def events(tp, log, start):
        return [Event(app, k, v, {}, Message(tp.topic, tp.partition, o, 0.0, 0, {}, k, v,
                                             None, tp=tp))
                for o, (k, v) in enumerate(log) if o >= start]
    ref.apply_changelog_batch(events(tp0, log0, 3) + events(tp1, log1, 0))
    assert bulk.data.data == ref.data.data == {b"a": b"a3", b"c": b"c7", b"d": b"d2",
                                               b"f": b"f3"}
    assert bulk.data._key_partition == ref.data._key_partition
