"""Batch delivery of the account topics (trades, collateral) inside Faust's own consumer.

Why: Faust hands records to agents one at a time. Per record it builds a message and an event,
races the callback against three events with four new futures (``Service.wait_first``), puts
the event on a channel queue, and acks it through a weak set under a lock. Measured on this
project's workload that costs ~60 us per record, so an agent that does nothing tops out at
~16,000 records/s, well below what the engine margins per second.

What stays Faust's: group membership and partition assignment, the changelog-backed table and
its recovery, offset commits (the same ``_acked`` bookkeeping Faust's own acks feed), flow
control during rebalances, and every other topic (table changelogs, the sink agents), which
still take the per-record path untouched.

What changes: for the topics registered in :class:`AccountFeed`, the consumer passes each fetch
(a list of records per partition) to the feed as it is; the accounts agent takes them in
micro-batches and, once a batch's outputs are acknowledged by the broker, acks its offsets in
bulk (:meth:`BatchConsumer.ack_records`).

Rebalances: a fetch is stamped with the feed's epoch when it arrives; a revocation bumps the
epoch and drops queued fetches, and a batch whose epoch is stale is neither processed nor
acked. After the rebalance Faust seeks to the committed offsets, so dropped records are read
again (by this worker or the partition's new owner), and the processor's per-account applied
offsets make a re-read harmless.
"""
from __future__ import annotations

import asyncio
from collections import deque

from faust.transport.drivers import aiokafka as faust_aiokafka
from mode.utils.futures import notify


class AccountFeed:
    """Fetched account-topic records waiting for the accounts agent (bounded: a full feed
    stops the fetch loop, which is the backpressure towards the broker)."""

    def __init__(self, topics, max_fetches: int = 16):
        self.topics = frozenset(topics)
        self.epoch = 0
        self._q: deque = deque()
        self._max = max_fetches
        self._not_empty = asyncio.Event()
        self._not_full = asyncio.Event()
        self._not_full.set()

    def revoke(self) -> None:
        """Forget everything fetched so far (called when partitions are revoked/assigned)."""
        self.epoch += 1
        self._q.clear()
        self._not_empty.clear()
        self._not_full.set()

    async def put(self, epoch: int, fetch: dict) -> None:
        while len(self._q) >= self._max:
            self._not_full.clear()
            await self._not_full.wait()
        if epoch != self.epoch:
            return
        self._q.append((epoch, fetch))
        self._not_empty.set()

    async def take(self, max_records: int) -> tuple[int, list]:
        """Wait for records, then return ``(epoch, records)``: every fetch queued now, up to
        ``max_records`` (whole fetches; the first always fits). No waiting to fill a batch:
        while one batch is processed the next accumulates, so batches grow with the load and
        latency stays at one processing round. Records of one partition keep their order."""
        while not self._q:
            self._not_empty.clear()
            await self._not_empty.wait()
        epoch, fetch = self._q.popleft()
        out = [r for recs in fetch.values() for r in recs]
        while self._q and self._q[0][0] == epoch:
            n = sum(len(v) for v in self._q[0][1].values())
            if len(out) + n > max_records:
                break
            out += [r for recs in self._q.popleft()[1].values() for r in recs]
        if not self._q:
            self._not_empty.clear()
        self._not_full.set()
        return epoch, out


class BatchConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with bulk hand-off of the feed's topics (see module doc)."""

    @property
    def feed(self) -> AccountFeed | None:
        return getattr(self.transport, "feed", None)

    async def getmany(self, timeout: float):
        feed = self.feed
        epoch = feed.epoch if feed is not None else 0
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

        if feed is not None:
            bulk = {tp: recs for tp, recs in records.items()
                    if tp.topic in feed.topics and recs}
            if bulk:
                records = {tp: recs for tp, recs in records.items() if tp not in bulk}
                if epoch == feed.epoch and generation_id == self.app.consumer_generation_id:
                    bulk = {tp: recs for tp, recs in bulk.items() if live(tp)}
                    for tp, recs in bulk.items():
                        await self._note_read(tp, recs)
                        self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                    if bulk:
                        await feed.put(epoch, bulk)

        # everything else: Faust's per-record path, exactly as its own getmany
        to_message = self._to_message
        for tp, record in self.scheduler.iterate(records):
            if not self.flow_active or self.app.consumer_generation_id != generation_id:
                break
            if live(tp):
                self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                yield tp, to_message(tp, record)

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


class BatchTransport(faust_aiokafka.Transport):
    """The aiokafka transport with :class:`BatchConsumer`; ``feed`` is set by the app."""

    Consumer = BatchConsumer
    feed: AccountFeed | None = None


def install(app, topics) -> AccountFeed:
    """Give ``app`` the batch transport for ``topics``; call before the app starts."""
    transport = BatchTransport(app.conf.broker_consumer, app)
    transport.feed = AccountFeed(topics)
    app.transport = transport
    return transport.feed
