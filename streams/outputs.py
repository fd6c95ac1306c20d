"""The worker's output producer: changelog records, margin events, risk snapshots and dead letters.

Why not Faust's (aiokafka) producer: a unit of work writes about one changelog record and one
snapshot row per input event, and aiokafka spends ~15 us of Python per send (message batching,
futures, the sender loop), which profiling put at a quarter of the worker's time under load.
librdkafka does the same work in C for ~1 us of Python per record.

Guarantees kept: ``acks=all`` with the idempotent producer (per-partition order survives
retries), the murmur2 partitioner (the partitions Faust and Java clients pick for a key, so an
account's records share its partition number), and a :meth:`OutputProducer.mark` resolves only
once every record queued before it is acknowledged, or fails.

Why marks instead of ``Producer.flush``: a flush returns when the client's whole queue is
empty, so under steady load a unit of work's flush also waited for the records of every unit
queued after it (at 10,000 events/s the account agent then spent 1.4-2.5 s of each 17 s
latency phase blocked on its bound of outstanding units). A mark covers the records queued
before it and nothing after.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from functools import partial

from confluent_kafka import Producer

from .osthread import name_this_thread
from .settings import Settings


class OutputError(RuntimeError):
    """A record could not be delivered: the unit of work must not be acknowledged."""


class _Group:
    """The records queued between two marks: how many, how many have a delivery report,
    the delivery errors, and the marks waiting for the group (and every group before it)."""

    __slots__ = ("queued", "reported", "errors", "waiters", "on_delivery")

    def __init__(self, owner: "OutputProducer"):
        self.queued = 0
        self.reported = 0
        self.errors: list[str] = []
        self.waiters: list = []
        self.on_delivery = partial(owner._reported, self)


def _settle(fut: asyncio.Future, errors: list[str]) -> None:
    if fut.done():  # a flush that timed out cancelled it
        return
    if errors:
        fut.set_exception(OutputError(f"delivery errors: {errors[:5]}"))
    else:
        fut.set_result(None)


class OutputProducer:
    def __init__(self, settings: Settings):
        self.producer = Producer({
            **settings.kafka_conf(), "partitioner": "murmur2_random", "acks": "all",
            "enable.idempotence": True, "linger.ms": 1, "compression.type": "lz4",
            "queue.buffering.max.messages": 2_000_000, "queue.buffering.max.kbytes": 2_097_151,
            "message.timeout.ms": 120_000})
        self._lock = threading.Lock()  # the groups, shared by marks (event loop) and reports
        self._group = _Group(self)      # records queued since the last mark
        self._closed: deque[_Group] = deque()  # marked groups not yet all reported, in order
        self._errors: list[str] = []    # every delivery error so far: later marks fail too
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()

    def send(self, topic: str, key: bytes | None, value: bytes,
             partition: int | None = None) -> None:
        """Queue one record (``partition`` None: chosen from the key by murmur2)."""
        if self._poller is None:
            self._start_poller()
        g = self._group
        g.queued += 1  # counted first: its report may come before produce returns
        try:
            while True:
                try:
                    if partition is None:
                        self.producer.produce(topic, value, key, on_delivery=g.on_delivery)
                    else:
                        self.producer.produce(topic, value, key, partition, g.on_delivery)
                    return
                except BufferError:  # local queue full (millions of records): let it drain
                    time.sleep(0.01)
        except BaseException:
            g.queued -= 1
            raise

    def mark(self) -> asyncio.Future:
        """A future that resolves once every record queued so far is acknowledged by the
        broker, or fails with :class:`OutputError` if any record queued so far could not be
        delivered. Marks resolve in the order they were made."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            g = self._group
            if g.queued:
                self._group = _Group(self)
                self._closed.append(g)
            if self._closed:
                self._closed[-1].waiters.append((loop, fut))
                self._release()  # the group may be fully reported already
            else:
                _settle(fut, self._errors)
        return fut

    async def flush(self, timeout: float = 120.0) -> None:
        """Wait until every queued record is acknowledged by the broker, or raise."""
        try:
            await asyncio.wait_for(self.mark(), timeout)
        except asyncio.TimeoutError:
            raise OutputError(f"{len(self.producer)} record(s) unacknowledged after "
                              f"{timeout:g}s") from None

    def close(self) -> None:
        """Stop serving delivery reports (after the last flush)."""
        self._stop.set()

    # -- delivery reports, on the poller thread ------------------------------------------------
    def _start_poller(self) -> None:
        """One thread serves the client's delivery reports (each takes the interpreter's
        lock briefly): started with the first record, so a producer never used starts none."""
        self._poller = threading.Thread(target=self._serve, name="outputs", daemon=True)
        self._poller.start()

    def _serve(self) -> None:
        name_this_thread("riskpipe-report")
        while not self._stop.is_set():
            self.producer.poll(0.1)

    def _reported(self, group: _Group, err, msg) -> None:
        with self._lock:
            group.reported += 1
            if err is not None:
                group.errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")
            if self._closed and self._closed[0] is group:
                self._release()

    def _release(self) -> None:
        """Settle the marks of the oldest groups whose records are all reported (in order:
        a mark covers every group before its own). Called under the lock."""
        closed = self._closed
        while closed and closed[0].reported >= closed[0].queued:
            g = closed.popleft()
            self._errors += g.errors
            for loop, fut in g.waiters:
                loop.call_soon_threadsafe(_settle, fut, list(self._errors))
