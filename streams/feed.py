"""Batch delivery of the hot topics (trades, collateral; the sink's inputs) inside Faust's own
consumer.

Why: Faust hands records to agents one at a time. Per record it builds a message and an event,
races the callback against three events with four new futures (``Service.wait_first``), puts
the event on a channel queue, and acks it through a weak set under a lock. Measured on this
project's workload that costs ~60 us per record, so an agent that does nothing tops out at
~16,000 records/s, well below what the engine margins per second.

What stays Faust's: group membership and partition assignment, the changelog-backed table and
its recovery (which partitions, from and to which offsets; only the records of the accounts
table's changelog are applied here, in bulk, see :func:`replay_changelog`), offset commits (the
same ``_acked`` bookkeeping Faust's own acks feed), flow control during rebalances, pausing a
partition whose consumer falls behind, and every other topic (reference data, a standby's
changelog partitions), which still takes the per-record path untouched.

What changes: for the topics of a :class:`Feed` (the account topics for the accounts agent;
``margin-calls`` and ``risk-snapshots`` for the sink agents, one margin event or snapshot chunk
per record), the consumer passes each fetch (a list of records per partition) to the feed as it
is; the agent takes them in micro-batches and, once a batch is done (outputs acknowledged,
rows stored), acks its offsets in bulk (:meth:`BatchConsumer.ack_records`).

Rebalances: a fetch is stamped with the feed's epoch when it arrives; a revocation bumps the
epoch and drops queued fetches, and a batch whose epoch is stale is neither processed nor
acked. After the rebalance Faust seeks to the committed offsets, so dropped records are read
again (by this worker or the partition's new owner), and the processor's per-account applied
offsets make a re-read harmless.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from faust.tables import TableManager
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode.utils.futures import notify

from .osthread import name_this_thread

log = logging.getLogger(__name__)

# records an aligned feed may hold back per fetch of its bound before pausing (see put)
STAGED_PER_FETCH = 4096


def _size(fetch: dict) -> int:
    """Bytes of the record values of a fetch."""
    return sum(len(r.value or b"") for recs in fetch.values() for r in recs)


class Feed:
    """Fetched records of some topics waiting for one agent.

    Bounded per partition group, never by blocking: when ``max_fetches`` fetches (or, if
    given, ``max_bytes`` of record values) are queued, the feed asks the consumer to stop
    fetching the partitions it holds (Faust's own buffer-full mechanism) and to resume them
    once the agent has taken the queue down to half. The sink's feeds are bounded in bytes
    too: they wait up to a second to fill a batch, so their fetch bound is set high, and the
    bytes keep a catch-up of large fetches within memory.
    The fetch loop itself never waits on a feed, so a stalled agent (the sink during a
    ClickHouse outage) cannot hold up the others (the accounts agent and margin calls)."""

    def __init__(self, topics, max_fetches: int = 16, align: bool = False,
                 align_max_wait_ms: int = 1000, max_bytes: int | None = None):
        self.topics = frozenset(topics)
        self.epoch = 0
        self._q: deque = deque()
        self._max = max_fetches
        self._max_bytes = max_bytes
        self._bytes = 0  # record values queued (counted only with max_bytes)
        self._not_empty = asyncio.Event()
        self._paused: set = set()
        self._consumer = None
        # event-time alignment of co-partitioned topics (see take): topics in tie-break
        # order, records fetched but not yet released, next offset received per partition,
        # and since when (loop time) each partition number has waited for a lagging topic
        self._align = list(topics) if align else None
        self._max_wait = align_max_wait_ms / 1000.0
        self._staged: dict[tuple, deque] = {}
        self._n_staged = 0
        self._next: dict[tuple, int] = {}
        self._blocked: dict[int, float] = {}
        self._warned: set[int] = set()
        self._turn = 0
        self.forced = 0  # releases out of event-time order, after the wait bound ran out
        # called with each partition fetch's lag (seconds from its oldest record's Kafka
        # timestamp to now): where input latency goes before the worker has the records
        self.on_fetch = None

    def revoke(self) -> None:
        """Forget everything fetched so far (called when partitions are revoked)."""
        self.epoch += 1
        self._q.clear()
        self._bytes = 0
        self._staged.clear()
        self._n_staged = 0
        self._next.clear()
        self._blocked.clear()
        self._warned.clear()
        self._not_empty.clear()
        if self._consumer is not None:  # revoked partitions are no longer ours to resume
            self._consumer._buffered_partitions.difference_update(self._paused)
        self._paused.clear()

    def put(self, epoch: int, fetch: dict, consumer=None) -> None:
        if epoch != self.epoch:
            return
        self._q.append((epoch, fetch))
        if self._max_bytes is not None:
            self._bytes += _size(fetch)
        self._not_empty.set()
        if self.on_fetch is not None:
            now = time.time()
            for recs in fetch.values():
                self.on_fetch(max(0.0, now - recs[0].timestamp / 1000.0))
        if consumer is not None:
            self._consumer = consumer
        full = self._full()
        if consumer is not None and (full or self._n_staged >= self._max * STAGED_PER_FETCH):
            for tp in fetch:
                tp = TP(tp.topic, tp.partition)  # Faust's own type, as its partition sets hold
                if not full and not self._staged.get((tp.topic, tp.partition)):
                    continue  # held back records may be waiting for this one: keep fetching it
                if tp not in self._paused:
                    consumer.on_buffer_full(tp)
                    self._paused.add(tp)

    def _full(self) -> bool:
        return len(self._q) >= self._max or (self._max_bytes is not None and
                                              self._bytes >= self._max_bytes)

    def _pop(self) -> tuple:
        item = self._q.popleft()
        if self._max_bytes is not None:
            self._bytes -= _size(item[1])
        return item

    def _maybe_resume(self) -> None:
        if self._paused and len(self._q) <= self._max // 2 and \
                (self._max_bytes is None or self._bytes <= self._max_bytes // 2) and \
                self._n_staged <= self._max * STAGED_PER_FETCH // 2:
            for tp in self._paused:
                self._consumer.on_buffer_drop(tp)
            self._paused.clear()

    async def take(self, max_records: int, within: float = 0.0) -> tuple[int, list]:
        """Wait for records, then return ``(epoch, records)``: every fetch queued now, up to
        ``max_records`` (whole fetches; the first always fits). By default there is no waiting
        to fill a batch: while one batch is processed the next accumulates, so batches grow
        with the load and latency stays at one processing round. ``within`` (seconds) waits
        for more first, for an agent that prefers fewer, larger batches (the ClickHouse sink:
        fewer parts). Records of one partition keep their order.

        An aligned feed (``align``) instead releases the records of each partition number in
        event-time order across its topics; see :meth:`_take_aligned`."""
        if self._align is not None:
            return await self._take_aligned(max_records)
        while True:
            while not self._q:
                self._not_empty.clear()
                await self._not_empty.wait()
            if within > 0:
                await self._fill(max_records, within)
            if self._q:
                break
            # a revocation emptied the queue while the batch filled: wait for new records
        epoch, fetch = self._pop()
        out = [r for recs in fetch.values() for r in recs]
        while self._q and self._q[0][0] == epoch:
            n = sum(len(v) for v in self._q[0][1].values())
            if len(out) + n > max_records:
                break
            out += [r for recs in self._pop()[1].values() for r in recs]
        if not self._q:
            self._not_empty.clear()
        self._maybe_resume()
        return epoch, out

    async def _fill(self, max_records: int, within: float) -> None:
        """Wait up to ``within`` seconds for the queue to hold ``max_records`` or be full."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self._q and not self._full() and \
                sum(len(r) for _, f in self._q for r in f.values()) < max_records:
            left = deadline - loop.time()
            if left <= 0:
                break
            self._not_empty.clear()
            try:
                await asyncio.wait_for(self._not_empty.wait(), left)
            except asyncio.TimeoutError:
                break

    async def _take_aligned(self, max_records: int) -> tuple[int, list]:
        """Event-time alignment of co-partitioned topics (trades and collateral changes).

        Why: an account's trades and collateral changes travel on two topics, and Kafka orders
        records only within a partition. Taken in arrival order, a trade could be applied
        before the deposit that preceded it whenever the collateral topic's fetch lagged
        (a backlog, a restart): a margin call or liquidation event for an account that was
        never short of margin, which a liquidation bot would act on.

        How (Kafka Streams' rule): records of partition ``p`` of every topic are merged by
        their Kafka timestamp (ties: the topics' order, collateral first). A record is held
        while another topic's partition ``p`` has nothing fetched but is known to hold more
        (its high watermark is beyond what this feed has received) or its end is not known
        yet; never longer than ``align_max_wait_ms``, after which the partition's records go
        in arrival order (counted in ``forced``) until the lagging topic catches up. At the
        live end of the log every partition is caught up and nothing waits. Records of one
        partition keep their order, so offsets are still acknowledged in sequence."""
        loop = asyncio.get_running_loop()
        while True:
            while self._q:
                for tp, recs in self._pop()[1].items():
                    key = (tp[0], tp[1])
                    self._staged.setdefault(key, deque()).extend(recs)
                    self._n_staged += len(recs)
                    self._next[key] = recs[-1].offset + 1
            out = self._release(max_records, loop.time())
            if out:
                self._maybe_resume()
                return self.epoch, out
            wait = None
            if self._blocked:
                wait = max(0.0, min(self._blocked.values()) + self._max_wait - loop.time())
            self._not_empty.clear()
            try:
                await asyncio.wait_for(self._not_empty.wait(), wait)
            except asyncio.TimeoutError:
                pass

    def _release(self, max_records: int, now: float) -> list:
        out: list = []
        parts = sorted({key[1] for key, d in self._staged.items() if d})
        for p in [p for p in self._blocked if p not in parts]:
            self._unblock(p)  # drained: its wait bound must not wake take() again
        if not parts:
            return out
        self._turn = (self._turn + 1) % len(parts)  # no partition starves under a backlog
        for p in parts[self._turn:] + parts[:self._turn]:
            group = [(t, p) for t in self._align]
            deqs = [self._staged.get(key) or deque() for key in group]
            while len(out) < max_records:
                live = [i for i, d in enumerate(deqs) if d]
                if not live:
                    self._unblock(p)  # nothing held back here any more
                    break
                if len(live) < len(deqs):
                    lagging = any(not deqs[i] and not self._caught_up(group[i])
                                  for i in range(len(deqs)))
                    if not lagging:
                        self._unblock(p)
                    else:
                        since = self._blocked.setdefault(p, now)
                        if now - since < self._max_wait:
                            break
                        self.forced += 1
                        if p not in self._warned:
                            self._warned.add(p)
                            log.warning("partition %d: account records taken out of event-time "
                                        "order: waited %.0f ms for %s", p,
                                        (now - since) * 1000,
                                        [k[0] for k, d in zip(group, deqs) if not d])
                    if len(live) == 1:  # the others have nothing to merge: all in order
                        d = deqs[live[0]]
                        n = min(len(d), max_records - len(out))
                        out += [d.popleft() for _ in range(n)]
                        continue
                else:
                    self._unblock(p)
                # the earliest head, then the rest of its run up to the next topic's head
                first, second = sorted(live, key=lambda k: (deqs[k][0].timestamp, k))[:2]
                d, bound = deqs[first], deqs[second][0].timestamp
                out.append(d.popleft())
                while d and len(out) < max_records and (
                        d[0].timestamp < bound or (d[0].timestamp == bound and first < second)):
                    out.append(d.popleft())
            if len(out) >= max_records:
                break
        self._n_staged -= len(out)
        return out

    def _unblock(self, p: int) -> None:
        self._blocked.pop(p, None)
        self._warned.discard(p)

    def _caught_up(self, key: tuple) -> bool:
        """True when the feed has received everything the broker held for ``key`` at its
        last fetch response; False while that is unknown."""
        c = self._consumer
        if c is None:
            return True
        tp = TP(*key)
        try:
            end = c.highwater(tp)
        except AssertionError:  # not assigned to this worker: nothing to wait for
            return True
        if end is None:
            return False
        received = self._next.get(key)
        if received is None:  # nothing since the assignment: the consumer starts at the commit
            received = c._committed_offset.get(tp)
        if received is None:  # nothing committed: where the reset put it (a log emptied by
            received = self._position(tp)  # retention ends where it starts)
        if received is None:
            return end == 0
        return received >= end

    def _position(self, tp) -> int | None:
        """The consumer's next offset of ``tp`` (after an offset reset: where it starts)."""
        try:
            state = self._consumer._thread._consumer._subscription.subscription.assignment \
                .state_value(tp)
        except AttributeError:  # not started, or no assignment yet
            return None
        return state.position if state is not None and state.has_valid_position else None


def replay_changelog(recovery, tables: dict, fetch: dict, read_offset) -> tuple[int, bool]:
    """Apply a fetch of changelog records (partition -> records) to the tables' stores while
    Faust recovers them, in bulk, and end the recovery when every active changelog partition
    is read. Returns the records applied and whether this ended the recovery.

    Why: Faust's own path takes each record through a message, the conductor, a queue and its
    recovery loop (a ``wait_for`` and an estimate of what remains, per record): ~70 us a
    record, so a restart with 260,000 records in the changelog replayed for 15-20 s before the
    worker could margin again. Here a record is a dict store.

    What stays Faust's: which partitions to recover, from which offset to which highwater (it
    seeks, and builds both, before resuming them), the end of recovery in its own loop (for
    the tables and partitions this does not take), and everything after. This does what its
    loop does per record: skip an offset already applied, apply in offset order (a value sets
    the key, a tombstone deletes it; the store's note of each key's partition kept, which it
    uses to drop the keys of partitions that move away), advance the partition's applied
    offset; and once nothing remains, what its loop does at the end: flush any buffered
    events, mark the recovery ended and signal it. Events Faust's path buffered before are
    flushed first (none of these partitions': the consumer hands every fetch of a replayed
    table's active partitions here while the recovery lasts)."""
    recovery.flush_buffers()
    offsets = recovery.active_offsets
    received = recovery._active_events_received_at
    now = time.monotonic()
    n = 0
    for tp, recs in fetch.items():
        store = tables[tp.topic].data
        data, where = store.data, store._key_partition
        p = tp.partition
        seen = offsets.get(tp, None)
        last = None
        for r in recs:
            off = r.offset
            if seen is not None and off <= seen:
                continue
            if r.value is None:
                data.pop(r.key, None)
                where.pop(r.key, None)
            else:
                data[r.key] = r.value
                where[r.key] = p
            last = off
            n += 1
        if last is not None:
            offsets[tp] = last
        read_offset[tp] = recs[-1].offset
        received[tp] = now
    if recovery.in_recovery and not recovery.need_recovery():
        recovery.flush_buffers()
        recovery._set_recovery_ended()
        recovery.signal_recovery_end.set()
        return n, True
    return n, False


class BatchConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with bulk hand-off of the feed's topics (see module doc)."""

    def _new_consumer_thread(self):
        return BatchConsumerThread(self, loop=self.loop, beacon=self.beacon)

    @property
    def feeds(self) -> dict:
        """topic -> the feed its records go to"""
        return getattr(self.transport, "feeds", None) or {}

    @property
    def replays(self) -> dict:
        """changelog topic -> its table, a Faust table on the memory store whose records are
        kept as they come (raw codec, no changelog callback; see :func:`replay_changelog`)"""
        return getattr(self.transport, "replays", None) or {}

    replayed = 0  # records applied by _replay in the current recovery
    replayed_total = 0  # ... in every recovery so far
    last_replay_seconds: float | None = None  # the last recovery that replayed in bulk

    async def getmany(self, timeout: float):
        feeds = self.feeds
        epochs = {id(f): f.epoch for f in feeds.values()}
        records, active_partitions = await self._wait_next_records(timeout)
        generation_id = self.app.consumer_generation_id
        if records is None or self.should_stop:
            return
        if not self.flow_active:
            try:
                await self.perform_seek()
            except Exception as ex:  # noqa: BLE001 - as Faust's own getmany
                self.log.warning(f"exception performing seek when flow not active {ex}")
            return

        def live(tp) -> bool:
            return active_partitions is None or tp in active_partitions or \
                tp in self._buffered_partitions

        replays = self.replays
        if replays and self.app.tables.recovery.in_recovery:
            recovery = self.app.tables.recovery
            replay = {tp: recs for tp, recs in records.items() if recs and
                      tp.topic in replays and tp in recovery.active_tps and live(tp)}
            if replay:
                records = {tp: recs for tp, recs in records.items() if tp not in replay}
                if generation_id == self.app.consumer_generation_id:
                    self._replay(recovery, replays, replay)
                # else a rebalance began meanwhile: recovery seeks again from the offsets
                # applied so far, so these records are read again

        bulk = {tp: recs for tp, recs in records.items() if tp.topic in feeds and recs}
        if bulk:
            records = {tp: recs for tp, recs in records.items() if tp not in bulk}
            per_feed: dict = {}
            for tp, recs in bulk.items():
                feed = feeds[tp.topic]
                per_feed.setdefault(id(feed), (feed, {}))[1][tp] = recs
            for feed, fetch in per_feed.values():
                epoch = epochs[id(feed)]
                if epoch != feed.epoch or generation_id != self.app.consumer_generation_id:
                    continue  # revoked meanwhile: Faust seeks back to the committed offsets
                fetch = {tp: recs for tp, recs in fetch.items() if live(tp)}
                for tp, recs in fetch.items():
                    await self._note_read(tp, recs)
                    self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                if fetch:
                    feed.put(epoch, fetch, self)

        # everything else: Faust's per-record path, exactly as its own getmany
        to_message = self._to_message
        for tp, record in self.scheduler.iterate(records):
            if not self.flow_active or self.app.consumer_generation_id != generation_id:
                break
            if live(tp):
                self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                yield tp, to_message(tp, record)

    def _replay(self, recovery, tables: dict, fetch: dict) -> None:
        """Apply a fetch of changelog records in bulk (see :func:`replay_changelog`)."""
        n, ended = replay_changelog(recovery, tables, fetch, self._read_offset)
        self.replayed += n
        self.replayed_total += n
        if ended:
            # from the recovery's start (offsets and highwaters read, partitions sought) to
            # its end: what a restart or a partition taken over waited for its state
            self.last_replay_seconds = time.monotonic() - recovery._recovery_started_at
            log.info("replayed %d changelog records in bulk; recovery took %.3f s",
                     self.replayed, self.last_replay_seconds)
            self.replayed = 0

    async def _note_read(self, tp, recs) -> None:
        """Read-offset and gap bookkeeping Faust's drain loop does per record, per fetch:
        offsets that will never arrive (compaction, transaction markers) count as acked."""
        prev = self._read_offset[tp]
        for r in recs:
            off = r.offset
            if prev is not None and off - prev > 1:
                await self._add_gap(tp, prev + 1, off)
            prev = off
        self._read_offset[tp] = prev

    def ack_records(self, records) -> None:
        """Mark processed records as acked in Faust's commit bookkeeping (``Consumer.ack``
        for a whole batch). Faust's commit timer (``broker_commit_interval``) commits them:
        a commit from here would make the agent wait on the consumer thread (up to a fetch
        timeout) on every ``broker_commit_every`` records."""
        by_tp: dict = {}
        for r in records:
            by_tp.setdefault((r.topic, r.partition), []).append(r.offset)
        for (topic, partition), offsets in by_tp.items():
            tp = self._new_topicpartition(topic, partition)
            committed = self._committed_offset[tp]
            index = self._acked_index[tp]
            new = [o for o in offsets if (committed is None or o >= committed)
                   and o not in index]
            index.update(new)
            self._acked[tp].extend(new)
            self._n_acked += len(new)
        notify(self._waiting_for_ack)


class BatchConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread with two fetcher waits bounded, and the bytes a fetch waits for
    set (``fetch_min_bytes``: a sink process's fetches wait to fill, the worker's do not).

    Why: the fetcher sends one fetch request per broker at a time, and skips partitions that
    still hold fetched records the worker has not taken yet.

    * While the worker is busy with a batch, the request it sends covers only the quiet
      partitions (a topic with no traffic, Faust's assignor topic); Faust asks the broker to
      hold such a request up to 1.5 s for data, and until it returns no other partition of
      that broker is fetched. ``fetch_max_wait_ms`` caps it (measured: 1 to 2 s gaps in the
      account topics' delivery at 10,000 events/s).
    * While any partition holds records not yet taken, the fetcher sends nothing to that
      broker for up to its prefetch back-off (100 ms). The table's changelog partitions are
      assigned to the worker but never read after recovery, so the first records the worker
      writes there after a (re)start are fetched and left: a 100 ms stall of every partition
      (measured: the first second of live traffic after a restart had a p99 of 140-160 ms,
      the later seconds 15-47 ms). ``prefetch_backoff_ms`` caps it."""

    async def on_start(self) -> None:
        name_this_thread("riskpipe-fetch")  # on_start runs on the consumer's own thread
        await super().on_start()
        fetcher = self._consumer._fetcher  # exists once the consumer has started
        wake_after_fetch(fetcher)
        backoff_ms = getattr(self.transport, "prefetch_backoff_ms", None)
        if backoff_ms is not None:
            fetcher._prefetch_backoff = backoff_ms / 1000.0
        gather = getattr(self.transport, "gather", None)
        if gather is not None:
            gather_while_flowing(fetcher, *gather)

    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        wait_ms = getattr(transport, "fetch_max_wait_ms", None)
        if wait_ms is not None:
            consumer._fetch_max_wait_ms = int(wait_ms)  # read when the consumer starts
        min_bytes = getattr(transport, "fetch_min_bytes", None)
        if min_bytes is not None:
            consumer._fetch_min_bytes = int(min_bytes)  # likewise
        return consumer


def wake_after_fetch(fetcher) -> None:
    """Make an aiokafka fetcher look again for work once a fetch request is over and its
    broker is free for the next one.

    Why: the fetcher's routine sends at most one fetch request per broker; it marks the broker
    busy when it sends one and a done-callback of the request's task frees it. When the routine
    is woken by something else (the worker took buffered records) in the same moment as the
    request ends, it runs before that callback: it sees the task done, drops it from the tasks
    it waits on, but still sees the broker busy, so it sends nothing and sleeps until its poll
    timeout (200 ms) or until records are taken, and none are coming. Every partition of that
    broker waits meanwhile. Traced in the pipeline bench: the latency phases' one-second stalls
    (p99 230-320 ms in one phase of ten) were such 200 ms sleeps, the records appended
    meanwhile handed to the worker at once, 195-267 ms after their append
    (docs/benchmarks.md).

    The fix: a done-callback of each request's task, added after the one that frees the
    broker, wakes the routine (the signal it waits on when records are taken). Woken twice is
    harmless: the routine only looks again."""
    proc = fetcher._proc_fetch_request

    async def proc_fetch_request(assignment, node_id, request):
        asyncio.current_task().add_done_callback(
            lambda _: fetcher._notify(fetcher._wait_consume_future))
        return await proc(assignment, node_id, request)

    fetcher._proc_fetch_request = proc_fetch_request


def gather_while_flowing(fetcher, min_bytes: int, max_wait_ms: int) -> None:
    """Make an aiokafka fetcher ask the broker to gather each fetch, up to ``max_wait_ms`` or
    ``min_bytes``, while the fetches return records; after a fetch that returned none it asks
    with its own settings again (the worker's: answer as soon as there is data, hold an empty
    fetch up to ``fetch_max_wait_ms``), until records flow again.

    Why: answered at once, every few records made a fetch round trip and a unit of work, and
    their fixed costs took more of the worker's CPU than the events did. At 2,000 events/s,
    per 10 s: 7,000-8,000 units of 2.5-2.8 events, the consumer thread 3.1-3.2 CPU-s, the
    event loop 4.1-4.2; gathering for up to 5 ms, 1,400-1,530 units, 1.2-1.5 and 2.3-3.0
    CPU-s. At 10,000 events/s the worker's CPU went from 10.0-10.5 to 7.8-8.8 s, and its
    event loop's wait for a CPU halved (docs/benchmarks.md). A record waits at most
    ``max_wait_ms`` more at the broker, and only while records flow: the first one after a
    quiet spell is answered at once, and an idle worker polls no faster than before (asking
    every fetch to gather, an idle worker polled 200 times a second: 2.4 CPU-s per 20 s
    against 0.9).

    The fetcher builds every request from these two attributes, so they are set between
    requests, after each response (one request per broker is in flight at a time)."""
    idle = (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms)
    gathering = (min_bytes, max_wait_ms)
    proc = fetcher._proc_fetch_request

    async def proc_fetch_request(assignment, node_id, request):
        got = await proc(assignment, node_id, request)  # True: records (or an error) buffered
        fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms = gathering if got else idle
        return got

    fetcher._proc_fetch_request = proc_fetch_request


class BatchTransport(faust_aiokafka.Transport):
    """The aiokafka transport with :class:`BatchConsumer`; ``feeds`` is set by the app."""

    Consumer = BatchConsumer
    feeds: dict | None = None
    replays: dict | None = None
    fetch_max_wait_ms: int | None = None
    fetch_min_bytes: int | None = None
    prefetch_backoff_ms: int | None = None
    gather: tuple[int, int] | None = None  # (min bytes, max wait ms): gather_while_flowing


class PromptTableManager(TableManager):
    """Faust's table manager without the second it sleeps before registering the tables.

    Why: Faust waits a fixed 1.0 s at start so that tables declared late can still register;
    every worker start, a restart after a crash included, paid it before recovery could begin
    (a third of a restart's 2.9 s in the bench). The app declares its tables before it starts
    (``Pipeline._build``), and Faust refuses one added after they are registered."""

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


def install(app, groups: dict[str, list[str]], max_fetches: dict[str, int] | None = None,
            fetch_max_wait_ms: int | None = None, fetch_min_bytes: int | None = None,
            prefetch_backoff_ms: int | None = None, aligned: dict[str, int] | None = None,
            max_bytes: dict[str, int] | None = None, replays=(),
            gather: tuple[int, int] | None = None) -> dict[str, Feed]:
    """Give ``app`` the batch transport with one feed per named group of topics; call before
    the app starts. ``aligned``: group name -> wait bound (ms) of the groups whose topics are
    merged in event-time order per partition (:meth:`Feed._take_aligned`; the group's topic
    order breaks ties). ``max_bytes``: group name -> the bound in bytes of record values of
    the groups bounded in bytes too (see :class:`Feed`). ``fetch_max_wait_ms``,
    ``fetch_min_bytes`` and ``prefetch_backoff_ms``: see :class:`BatchConsumerThread` (None:
    the client's own). ``replays``: tables whose changelogs are replayed in bulk during
    recovery (see :func:`replay_changelog`). ``gather``: (min bytes, max wait ms) of the
    fetches while records flow (:func:`gather_while_flowing`; None: never). Returns the feeds
    by name."""
    transport = BatchTransport(app.conf.broker_consumer, app)
    transport.fetch_max_wait_ms = fetch_max_wait_ms
    transport.fetch_min_bytes = fetch_min_bytes
    transport.prefetch_backoff_ms = prefetch_backoff_ms
    transport.gather = gather
    bounds = max_fetches or {}
    aligned = aligned or {}
    max_bytes = max_bytes or {}
    feeds = {name: Feed(topics, bounds.get(name, 16), align=name in aligned,
                        align_max_wait_ms=aligned.get(name, 1000),
                        max_bytes=max_bytes.get(name))
             for name, topics in groups.items()}
    transport.feeds = {t: f for f in feeds.values() for t in f.topics}
    transport.replays = {t.changelog_topic.get_topic_name(): t for t in replays}
    app.transport = transport
    return feeds
