"""Faust application factory: agents for account events, a broadcast reader for market and
reference data, outputs to margin-calls, dead-letters and the results sink.

Design (see README "Architecture"):

* ``accounts`` agent, concurrency 1 (faust #606), consumes trades + collateral (co-partitioned by
  account) in micro-batches and hands them to :class:`RiskProcessor`. Faust's consumer delivers
  these two topics, and the sink agents' two, in bulk (streams/feed.py) instead of one event at
  a time.
* Account state lives in a changelog-backed Faust table ``accounts`` (one record per account).
  The engine's numpy account book is a cache of it, rebuilt after every rebalance. Table writes
  always name the account's partition explicitly, so market-driven updates (made outside an
  agent) land on the same changelog partition as trade-driven ones.
* Quotes, instruments and risk params are *broadcast*: every worker reads all partitions with a
  group-less consumer (no GlobalTable, avoiding faust #283) and computes the same risk arrays.
  Ticks are coalesced: risk arrays are recomputed at most every ``coalesce_ms`` and the dirty
  flag guarantees the last tick is always applied.
* Each batch's outputs (margin events, dead letters, changelog records) are awaited until the
  broker acknowledges them before the batch's input offsets can be committed: at-least-once
  with deterministic event ids, so a replay re-emits identical events rather than new ones.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import gc
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import faust
import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

import engine as E
from schemas import Codec, ConfluentCodec, SchemaError

from .feed import PromptTableManager, install as install_feed, wake_after_fetch
from .osthread import name_this_thread
from .outputs import OutputProducer
from . import rowblock
from .processor import Output, Rejected, RiskProcessor, account_parts, n_rows
from .settings import Settings

log = logging.getLogger(__name__)


# how long, and how many, quotes of an instrument not listed yet are held for its Instrument
# record (on another topic, possibly fetched later) before they are dead-lettered
QUOTE_HOLD_S = 5.0
QUOTE_HOLD_MAX = 10_000

# bounds (s) of the latency histograms: end to end, and the part before the worker has its input
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Histogram:
    """A Prometheus histogram (cumulative buckets, text exposition) without global state."""

    def __init__(self, name: str, help_: str, buckets):
        self.name, self.help = name, help_
        self.buckets = list(buckets)
        self._edges = np.asarray(self.buckets, dtype=np.float64)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.n += 1

    def observe_many(self, values: np.ndarray) -> None:
        """:meth:`observe` of each value (the same buckets: ``searchsorted`` on the left is
        ``bisect_left``), in numpy: the account path observes every input event."""
        if values.size == 0:
            return
        idx = np.searchsorted(self._edges, values, side="left")
        for k, c in enumerate(np.bincount(idx, minlength=len(self.counts)).tolist()):
            self.counts[k] += c
        self.sum += float(values.sum())
        self.n += int(values.size)

    def text(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{b}"}} {acc}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.n}')
        out += [f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.n}"]
        return out


class Pipeline:
    """Everything a worker holds; ``app`` is the Faust app."""

    def __init__(self, settings: Settings, sink=None):
        self.s = settings
        self.codec = ConfluentCodec(settings.schema_registry_url) \
            if settings.schema_registry_url else Codec()
        self.processor = RiskProcessor(
            E.StateThresholds(settings.warning_level, settings.hysteresis,
                              settings.liquidation_buffer),
            snapshot_interval_ms=settings.snapshot_interval_ms,
            tick_interval_ms=settings.coalesce_ms)
        self.sink = sink
        # roles: "all" does everything in one process; "margin" runs the account path and
        # produces snapshots for a sink elsewhere; "sink" only stores the two output topics
        self.margin_role = settings.role in ("all", "margin")
        self.sink_role = settings.role in ("all", "sink") and sink is not None
        if settings.role == "sink" and sink is None:
            raise ValueError("the sink role needs a ClickHouse sink")
        # risk snapshots and stress rows feed the results store, here or in a sink process
        self.produces_snapshots = self.margin_role and (sink is not None or
                                                        settings.role == "margin")
        self.out = OutputProducer(settings)
        if sink is not None:
            sink.on_rejected = self._sink_rejected
        self.worker_id = f"{settings.app_id}@{__import__('socket').gethostname()}:" \
                         f"{__import__('os').getpid()}"
        self._last_stress = 0.0
        self.metrics = {"events_in": 0, "margin_events": 0, "dead_letters": 0, "batches": 0,
                        "market_ticks": 0}
        # seconds spent per stage (for the benchmark's breakdown and ops dashboards)
        self.timings = {"process": 0.0, "decode": 0.0, "apply": 0.0, "persist": 0.0,
                        "flush": 0.0, "wait": 0.0, "backpressure": 0.0, "sink": 0.0,
                        "stress": 0.0, "tick": 0.0, "tick_kernel": 0.0}
        self.events_by_topic: dict[str, int] = {}
        self.gc_seconds = [0.0, 0.0, 0.0]  # per generation: collector pauses stall the loop
        self._gc_t0 = 0.0
        gc.callbacks.append(self._gc_callback)
        self.latency = Histogram("riskpipe_event_to_output_seconds",
                                 "event time of an input record to its outputs acknowledged",
                                 LATENCY_BUCKETS)
        # the part of that before the worker: a fetch's oldest record, from its Kafka timestamp
        # (the producer's, or the broker's append time) to its arrival in the accounts feed
        self.fetch_lag = Histogram("riskpipe_input_fetch_lag_seconds",
                                   "Kafka timestamp of the oldest record of each partition's "
                                   "fetch to its arrival at the accounts agent",
                                   LATENCY_BUCKETS)
        self.sink_latency = Histogram("riskpipe_sink_batch_seconds",
                                      "ClickHouse insert time per batch",
                                      (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5))
        self.needs_sync = True
        self.stopping = False
        self._synced_once = False
        self.ref_ready = asyncio.Event()
        self._bc_consumer = None
        # one unit of work at a time (an agent batch, a market tick, a parameter change), so
        # an account's margin events reach the topic in sequence order
        self.work_lock = asyncio.Lock()
        # units of work awaiting the broker, oldest first; each one's acknowledgement runs
        # after the one before it (see acknowledge_later)
        self._pending: collections.deque[asyncio.Future] = collections.deque()
        # the market tick's margin kernel runs here, off the event loop (see market_tick)
        self._tick_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tick",
                                             initializer=name_this_thread,
                                             initargs=("riskpipe-tick",))
        if sink is not None:
            sink.on_batch = self.sink_latency.observe
        self._applied: dict = {}   # broadcast TopicPartition -> next offset to apply
        # quotes of instruments not listed yet, by instrument: (held since, tp, message,
        # record), applied once the Instrument record comes (see apply_broadcast)
        self._held_quotes: dict[str, list] = {}
        self.app = self._build()

    # -- app ----------------------------------------------------------------------------------
    def _build(self) -> faust.App:
        s = self.s
        brokers = [f"kafka://{b.strip()}" for b in s.kafka_bootstrap.split(",")]
        (s.data_dir / "faust").mkdir(parents=True, exist_ok=True)
        kw = {}
        if s.kafka_security_protocol != "PLAINTEXT":
            kw["broker_credentials"] = _faust_credentials(s)
        app = faust.App(
            # a sink process is its own consumer group: it reads only the output topics
            s.app_id if self.margin_role else f"{s.app_id}-sink", broker=brokers,
            store=s.store, datadir=str(s.data_dir / "faust"),
            topic_partitions=s.partitions, topic_replication_factor=s.replication_factor,
            processing_guarantee="at_least_once", consumer_auto_offset_reset="earliest",
            broker_commit_interval=1.0, broker_commit_every=10_000,
            stream_buffer_maxsize=65536, stream_wait_empty=False,
            web_enabled=s.web_port > 0, web_port=max(s.web_port, 1), web_bind=s.web_host,
            producer_acks=-1, producer_linger_ms=2, table_standby_replicas=0,
            topic_allow_declare=True, key_serializer="raw", value_serializer="raw",
            TableManager=PromptTableManager, **kw)
        self.app = app
        raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw",
                   value_serializer="raw")
        self.margin_topic = app.topic(s.topic("margin-calls"), partitions=s.partitions, **raw)
        self.snapshot_topic = app.topic(s.topic("risk-snapshots"), partitions=s.partitions,
                                        **raw)
        groups = {}
        if self.margin_role:
            # collateral first: at equal event times a deposit is applied before a trade
            groups["accounts"] = [s.topic("collateral"), s.topic("trades")]
            self._build_margin(app, raw)
        if self.sink_role:
            groups["sink-snapshots"] = [s.topic("risk-snapshots")]
            groups["sink-events"] = [s.topic("margin-calls")]
        sinks = ("sink-snapshots", "sink-events")
        self.feeds = install_feed(app, groups, {g: s.sink_buffer for g in sinks},
                                  fetch_max_wait_ms=(s.fetch_max_wait_ms if self.margin_role
                                                     else s.sink_fetch_max_wait_ms),
                                  fetch_min_bytes=(1 if self.margin_role
                                                   else s.sink_fetch_min_bytes),
                                  gather=((s.fetch_gather_bytes, s.fetch_gather_ms)
                                          if self.margin_role and s.fetch_gather_ms > 0
                                          else None),
                                  prefetch_backoff_ms=s.prefetch_backoff_ms,
                                  aligned={"accounts": s.align_max_wait_ms},
                                  max_bytes={g: s.sink_buffer_mb << 20 for g in sinks},
                                  replays=[self.table] if self.margin_role else [])
        self.feed = self.feeds.get("accounts")
        if self.feed is not None:
            self.feed.on_fetch = self.fetch_lag.observe
        if self.sink_role:
            self._build_sink(app)
        if s.web_port > 0:
            self._build_pages(app)
        app.on_before_shutdown.connect(self._on_shutdown)
        app.on_partitions_assigned.connect(self._on_assign)
        app.on_partitions_revoked.connect(self._on_revoke)

        @app.task
        async def event_loop_in_use():
            """Which event loop runs (``RISKPIPE_EVENT_LOOP``), in the log at start."""
            loop = type(asyncio.get_running_loop())
            log.info("event loop: %s.%s", loop.__module__.split(".")[0], loop.__name__)
        return app

    def _build_margin(self, app: faust.App, raw: dict) -> None:
        """The account path: the accounts table and agent, the market reader, the timers."""
        s = self.s
        # records recover as the bytes persisted (value_type bytes: Faust's raw codec), read by
        # account_parts in either format; Faust's JSON codec would refuse format 2
        self.table = app.Table("accounts", default=None, partitions=s.partitions,
                               key_type=bytes, value_type=bytes)
        self.account_topic = app.topic(s.topic("trades"), s.topic("collateral"),
                                       partitions=s.partitions, **raw)

        @app.agent(self.account_topic, concurrency=1, name="accounts")
        async def accounts(stream):
            # subscribes the topics; their records arrive in bulk through the feed (see
            # streams/feed.py), never one by one through this stream
            stream.channel.__aiter__()
            await self.ref_ready.wait()
            t_end = time.perf_counter()
            while True:
                epoch, batch = await self.feed.take(s.batch_max)
                t0 = time.perf_counter()
                self.timings["wait"] += t0 - t_end
                try:
                    decoded = await self.decode_and_catch_up(batch)
                    async with self.work_lock:
                        if self.stopping:
                            return
                        if epoch == self.feed.epoch:  # else revoked meanwhile: re-read later
                            finish = await self.start_account_batch(batch, epoch, decoded)
                            await self.acknowledge_later(finish)
                except Exception as exc:  # noqa: BLE001
                    # never let Faust's supervisor restart the agent past a half-done batch:
                    # stop the worker, so it restarts from the committed offsets
                    log.exception("unexpected error in a batch; stopping the worker")
                    await app.crash(exc)
                    return
                t_end = time.perf_counter()
                self.timings["process"] += t_end - t0

        @app.task
        async def market():
            try:
                await self.run_broadcast()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                # without market data the worker would margin on stale prices: stop loudly
                log.exception("broadcast reader failed; stopping the worker")
                await app.crash(exc)

        @app.task
        async def presync():
            """At start, load the recovered accounts into the engine as soon as the table is
            recovered instead of inside the first batch (a latency spike). Only the first
            time: Faust never clears its recovery-completed flag, so after a rebalance the
            flag cannot tell whether the new partitions are recovered yet; then the first
            batch syncs, as it can only arrive once they are. Polled every 50 ms until done
            (a half-second timer left a restarted worker idle for a quarter second on
            average once the replay went in bulk), then the task ends."""
            while not self._synced_once:
                if self.needs_sync and self.ref_ready.is_set() and self._recovered() and \
                        not self.app.in_recovery:
                    async with self.work_lock:
                        if self._synced_once:  # the first batch was first
                            return
                        await self.sync()
                        if gc.get_freeze_count():  # the start-up heap was frozen (cli._tune_gc)
                            # the recovered accounts are long-lived too: out of the collector's
                            # sight, or its first full collection walks them during live traffic
                            gc.collect()
                            gc.freeze()
                    return
                await asyncio.sleep(0.05)

        @app.timer(5.0)
        async def stress():
            """Exchange-wide stress in steps of a few thousand accounts, releasing the work
            lock between steps: account batches run in between instead of waiting for the
            whole book (tens of ms)."""
            if not (self.produces_snapshots and self.ref_ready.is_set()):
                return
            per = {} if s.scenario_pnl else None
            async with self.work_lock:
                await self.sync()
                run = self.processor.stress_run(per)
            more = True
            while more:
                async with self.work_lock:
                    t0 = time.perf_counter()
                    more = run.step()
                    self.timings["stress"] += time.perf_counter() - t0
                await asyncio.sleep(0)
            # queued under the lock and acknowledged in the background, in order with the
            # units around them, as a market tick's outputs are: waiting here for the broker
            # (emit's flush, of everything outstanding) held the work lock, so every account
            # batch and tick, a broker round trip twice in ten seconds
            async with self.work_lock:
                t0 = time.perf_counter()
                out = Output(stress=run.rows(self.worker_id))
                await self.queue_outputs(out)
                if per:
                    self._send_columns("scenario_pnl", per, chunk=20_000)
                await self.acknowledge_queued(out)
                self.timings["stress"] += time.perf_counter() - t0

        self.accounts_agent = accounts

    def _build_sink(self, app: faust.App) -> None:
        """The sink agents: the two output topics into ClickHouse."""
        @app.task
        async def open_sink():
            await self.sink.open()

        @app.agent(self.snapshot_topic, concurrency=1, name="sink-snapshots")
        async def sink_snapshots(stream):
            stream.channel.__aiter__()  # subscribes; records arrive through the feed
            await self._sink_loop(self.feeds["sink-snapshots"], self.sink_snapshot_batch)

        @app.agent(self.margin_topic, concurrency=1, name="sink-events")
        async def sink_events(stream):
            stream.channel.__aiter__()
            await self._sink_loop(self.feeds["sink-events"], self.sink_event_batch)

    def _build_pages(self, app: faust.App) -> None:
        if self.sink_role:
            @app.page("/sql")
            async def sql(web, request):
                """Read-only SQL on the worker's store, for analysts while the worker runs
                (the embedded engine allows one process per data path). Loopback only."""
                q = request.query.get("q", "")
                if not q.lstrip().lower().startswith(("select", "with", "show", "describe")):
                    return web.json({"error": "only SELECT/WITH/SHOW/DESCRIBE"}, status=400)
                try:
                    r = await self.sink.run_query(q)
                except Exception as e:  # noqa: BLE001 - reported to the caller
                    return web.json({"error": str(e).splitlines()[0]}, status=400)
                return web.json({"columns": list(r.column_names),
                                 "rows": [[_jsonable(v) for v in row] for row in r.result_rows]})

        @app.page("/metrics")
        async def metrics(web, request):
            return web.text(self.prometheus(), content_type="text/plain")

    async def _on_assign(self, sender, assigned, **kw):
        self.needs_sync = True

    async def _on_revoke(self, sender, revoked, **kw):
        """Drop fetched-but-unprocessed account records and let the batch in flight finish
        (its outputs flushed) before the partitions change hands."""
        self.needs_sync = True
        for feed in self.feeds.values():
            feed.revoke()
        async with self.work_lock:
            await self.finish_pending()

    async def _on_shutdown(self, sender, **kw):
        """Graceful stop (SIGTERM): Faust has stopped fetching; let the batch in flight finish
        and commit its offsets, so a restart does not redo it. (A crash or kill -9 skips this
        and the restart replays from the last commit, which is harmless, only slower.)"""
        async with self.work_lock:  # the batch in flight ends, acked; no new batch starts
            self.stopping = True
            try:
                await self.finish_pending()
            except Exception as exc:  # noqa: BLE001 - not acked: the next owner redoes it
                log.warning("last batch not acknowledged at stop: %s", exc)
        for feed in self.feeds.values():
            feed.revoke()
        try:
            await self.out.flush(30)
            await self.app.consumer.commit()
        except Exception as exc:  # noqa: BLE001 - the offsets are committed by the next owner
            log.warning("final offset commit failed: %s", exc)
        self.out.close()

    def owned_partitions(self) -> set[int]:
        try:
            tps = self.app.assignor.assigned_actives()
        except Exception:  # before the first assignment
            return set()
        return {tp.partition for tp in tps if tp.topic == self.s.topic("trades")}

    # -- state sync ---------------------------------------------------------------------------
    def sync_from_table(self) -> list[dict]:
        """Make the engine's book mirror the table (after a rebalance or recovery). Returns
        the outbox events of loaded accounts: they may not have reached the topic before the
        previous owner stopped, so the caller re-sends them (identical content and ids)."""
        if not self.needs_sync:
            return []
        self.needs_sync = False
        self._synced_once = True
        owned = self.owned_partitions()
        t0 = time.perf_counter()
        proc = self.processor
        keep, resend = [], []
        for key, value in self.table.data.items():
            if not value:
                continue
            acct = key.decode() if isinstance(key, bytes) else key
            rec, names, qty, cost = account_parts(value)  # persisted or recovered bytes
            if rec.get("p", -1) not in owned:
                continue
            keep.append(acct)
            if acct not in proc.seq or proc.seq[acct] != rec["seq"] or \
                    proc.offsets.get(acct) != rec["off"]:
                proc.load_account_parts(acct, rec, names, qty, cost)
                resend += proc.outbox.get(acct, [])
        proc.drop_accounts(keep)
        log.info("synced %d accounts from table for partitions %s in %.3f s (%d outbox events "
                 "to re-send)", len(keep), sorted(owned), time.perf_counter() - t0, len(resend))
        return resend

    async def sync(self) -> None:
        resend = self.sync_from_table()
        if resend:
            await self.emit(Output(events=resend), resend_only=True)

    def persist(self, accts) -> int:
        """Queue the accounts' records (encoded here once, see
        :meth:`RiskProcessor.account_record_bytes`) for the table's changelog, on each
        account's own partition, and mirror them in the table's local store; the caller
        flushes to make them durable. Returns how many were written.

        Records go to the output producer rather than through the table's ``send_soon``
        buffer: with one record per touched account per batch, that buffer fills and every
        further send waits on the event loop.

        The local copy is the encoded bytes, not the dict: a record is some twenty lists and
        dicts, replaced on every touch, and CPython starts a young collection only when
        allocations outnumber frees by its threshold. Replacing records churns evenly, so the
        replacements piled up uncollected (400,000 objects at 20,000 accounts) and each young
        collection walked them all: 0.2 to 0.3 s pauses of the event loop."""
        proc = self.processor
        n = 0
        encode = proc.account_record_bytes
        part = proc.partition
        send = self.out.send
        local = self.table.data.data  # the memory store's dict (no per-key hooks to run)
        topic = self.table.changelog_topic.get_topic_name()
        for a in accts:
            p = part.get(a, -1)
            if p < 0:
                continue
            key = a.encode()
            value = encode(a)
            local[key] = value  # bytes: no objects for the collector to walk (see docstring)
            send(topic, key, value, p)
            n += 1
        return n

    def _send(self, topic: str, key: bytes, value: bytes) -> None:
        self.out.send(topic, key, value)

    # -- account events -----------------------------------------------------------------------
    async def catch_up_reference(self, timeout: float = 10.0) -> None:
        """Wait until the broadcast reader has applied every instrument and risk-params record
        that exists now: an exchange may publish an instrument and trade it a moment later."""
        c = self._bc_consumer
        if c is None:
            return
        tps = [tp for tp in self._applied if tp.topic in (self.s.topic("instruments"),
                                                           self.s.topic("risk-params"))]
        ends = await c.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while any(self._applied.get(tp, 0) < ends[tp] for tp in tps) and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def finish_pending(self) -> None:
        """Wait until every unit of work awaiting the broker is acknowledged."""
        while self._pending:
            await self._pending.popleft()

    async def acknowledge_later(self, finish) -> None:
        """Run a unit's ``finish`` (await its outputs' acknowledgement, then ack its input
        offsets) in the background, after the finish of the unit before it, so offsets are
        acked in order; at most ``RISKPIPE_OUTSTANDING_UNITS`` wait at once (beyond that, this
        waits for the oldest).

        Why allow several: with one, every batch first waits for the previous batch's
        acknowledgement, holding the work lock for a broker round trip (1-5 ms, 13-29 ms when
        the broker is busy) in which neither the next batch nor a market tick can run. The
        guarantee is the same either way: a batch's offsets are acked only after its outputs
        and everything queued before them; a crash redoes every unacknowledged batch.

        Not waiting, the agent takes a backlog in smaller, earlier batches. That once let a
        trade overtake its account's deposit on the other topic; the feed now merges the two
        topics in event-time order (``Feed._take_aligned``), whatever the batch sizes."""
        prev = self._pending[-1] if self._pending else None

        async def after_prev() -> None:
            if prev is not None:
                await prev
            await finish()
        self._pending.append(asyncio.ensure_future(self._finish_or_stop(after_prev)))
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()
        if len(self._pending) > self.s.outstanding_units:
            t0 = time.perf_counter()
            while len(self._pending) > self.s.outstanding_units:
                await self._pending.popleft()
            self.timings["backpressure"] += time.perf_counter() - t0

    async def acknowledge_queued(self, out: Output) -> None:
        """:meth:`acknowledge_later` for a unit whose records are all queued already (a market
        tick, a stress run): its finish waits for a mark of everything queued up to now, then
        drops ``out``'s margin events from the outboxes. Call under the work lock."""
        delivered = self.out.mark()
        await self.acknowledge_later(lambda: self.flush_outputs(out, delivered))

    async def _finish_or_stop(self, finish) -> None:
        """Run a batch's ``finish`` in the background; a failure stops the worker at once (the
        batch is not acked, so a restart redoes it) rather than when the next batch comes."""
        try:
            await finish()
        except Exception as exc:  # noqa: BLE001
            log.exception("outputs of a batch were not acknowledged; stopping the worker")
            await self.app.crash(exc)
            raise

    def decode_batch(self, batch) -> tuple[list, list[Rejected], bool]:
        """Decode and validate one micro-batch of consumer records (anything with topic,
        partition, offset, key and value): ``(decoded, rejected, unknown)``, ``unknown`` when
        a trade names an instrument not listed yet. Reads the processor's universe only."""
        decoded = []
        rejected: list[Rejected] = []
        trades = self.s.topic("trades")
        known = self.processor.universe.__contains__
        unknown = False
        for m in batch:
            try:
                name, rec = self.codec.decode(m.value, millis=True)  # ts: epoch ms
                expect = "Trade" if m.topic == trades else "CollateralChange"
                if name != expect:
                    raise SchemaError(f"{name} record on {m.topic}, expected {expect}")
                if m.key is not None and m.key != rec["account"].encode():
                    raise SchemaError(f"key {m.key!r} does not match account "
                                      f"{rec['account']!r}: the record is on the wrong partition")
            except SchemaError as e:
                rejected.append(Rejected(m.topic, m.partition, m.offset, type(e).__name__,
                                         str(e)))
                continue
            decoded.append((name, rec, m.topic, m.partition, m.offset))
            if name == "Trade" and not known(rec["instrument"]):
                unknown = True
        return decoded, rejected, unknown

    async def decode_and_catch_up(self, batch) -> tuple[list, list[Rejected], bool]:
        """:meth:`decode_batch`, then, if a trade names an unlisted instrument, wait for the
        broadcast reader to apply the reference data published so far.

        Never under the work lock: the reader may itself be waiting for that lock (in a market
        tick), so a batch waiting for it under the lock stalled until the wait timed out
        (10 s), and its trades were then rejected as in an unlisted instrument."""
        t0 = time.perf_counter()
        decoded = self.decode_batch(batch)
        self.timings["decode"] += time.perf_counter() - t0
        if decoded[2]:
            await self.catch_up_reference()
        return decoded

    async def start_account_batch(self, batch, epoch: int | None, decoded):
        """Apply one micro-batch of consumer records (``decoded``: what
        :meth:`decode_and_catch_up` made of them) and queue its outputs; returns the coroutine
        function that awaits their acknowledgement, then acks the batch's offsets (unless
        ``epoch`` is stale: revoked).

        Why split: awaiting the broker took a third of the account path's time at 10,000
        events/s (a few ms per batch, the agent idle meanwhile). The agent runs the next batch
        while the previous one is acknowledged; nothing it emits depends on that wait, margin
        events still wait for their account records (``emit``), and a batch's offsets are
        still acked only once its outputs (and everything queued before) are acknowledged."""
        await self.sync()
        decoded, rejected, _ = decoded
        t1 = time.perf_counter()
        out = self.processor.apply_account_events(decoded)
        self.timings["apply"] += time.perf_counter() - t1
        out.rejected = rejected + out.rejected
        messages = {(m.topic, m.partition, m.offset): m
                    for m in batch} if out.rejected else None  # only to dead-letter bytes
        await self.queue_outputs(out, messages)
        delivered = self.out.mark()  # this batch's records and everything before them

        async def finish() -> None:
            await self.flush_outputs(out, delivered)
            if epoch is not None and epoch == self.feed.epoch:
                self.app.consumer.ack_records(batch)
            # counted once the batch's outputs are acknowledged: "events in" means done
            self.metrics["events_in"] += len(batch)
            self.metrics["batches"] += 1
            now_ms = time.time() * 1000
            by_topic = self.events_by_topic
            for topic, n in collections.Counter([d[2] for d in decoded]).items():
                by_topic[topic] = by_topic.get(topic, 0) + n
            ts = np.fromiter([d[1]["ts"] for d in decoded], dtype=np.float64,
                             count=len(decoded))
            self.latency.observe_many(np.maximum(0.0, now_ms - ts) / 1000)
        return finish

    async def emit(self, out: Output, messages=None, resend_only: bool = False) -> None:
        """Send a unit of work's outputs; returns once the broker has acknowledged them all.

        Order matters for exactly-once *content*: the account records (state, sequence,
        applied offsets and the outbox of new margin events) are made durable first, then the
        margin events are sent. A crash in between re-sends the outbox after recovery."""
        await self.queue_outputs(out, messages, resend_only)
        await self.flush_outputs(out)

    async def queue_outputs(self, out: Output, messages=None, resend_only: bool = False
                            ) -> None:
        """:meth:`emit` up to the final acknowledgement (records made durable before their
        margin events are queued)."""
        proc = self.processor
        if not resend_only:
            for evt in out.events:
                proc.outbox.setdefault(evt["account"], []).append(evt)
            t0 = time.perf_counter()
            n = self.persist(out.touched | {e["account"] for e in out.events})
            self.timings["persist"] += time.perf_counter() - t0
            if n and out.events:
                await self.out.flush()  # records durable before their events go out
        margin_topic = self.s.topic("margin-calls")
        for evt in out.events:
            self._send(margin_topic, evt["account"].encode(),
                       self.codec.encode("MarginEvent", evt))
        for r in out.rejected:
            self._dead_letter(r, (messages or {}).get((r.topic, r.partition, r.offset)))
        if self.produces_snapshots and (n_rows(out.snapshots) or out.stress):
            self._send_snapshots(out)
        self.metrics["margin_events"] += len(out.events)

    async def flush_outputs(self, out: Output, delivered: asyncio.Future | None = None
                            ) -> None:
        """Wait until everything queued so far is acknowledged (or, with ``delivered``, a mark
        made when the unit was queued: everything queued up to then), then drop ``out``'s
        margin events from the outboxes (delivered)."""
        proc = self.processor
        # one wait for the whole unit of work: every record above is acknowledged before the
        # batch's input offsets can be committed (cheaper than awaiting each send's future)
        t0 = time.perf_counter()
        if delivered is None:
            await self.out.flush()
        else:
            await delivered
        self.timings["flush"] += time.perf_counter() - t0
        sent = {e["event_id"] for e in out.events}
        for acct in {e["account"] for e in out.events}:  # delivered: drop from the outbox
            left = [e for e in proc.outbox.get(acct, []) if e["event_id"] not in sent]
            if left:
                proc.outbox[acct] = left
            else:
                proc.outbox.pop(acct, None)

    def _dead_letter(self, r: Rejected, m=None, value: bytes | None = None) -> None:
        """Queue one DeadLetter (original bytes from ``m``, or ``value``); callers flush."""
        rec = dead_letter(r, m)
        if value is not None:
            rec["value"] = value
        self._send(self.s.topic("dead-letters"), r.topic.encode(),
                   self.codec.encode("DeadLetter", rec))
        self.metrics["dead_letters"] += 1
        log.warning("dead letter %s[%d]@%d: %s: %s", r.topic, r.partition, r.offset,
                    r.error_type, r.reason)

    def _send_snapshots(self, out: Output, chunk: int = 2000) -> None:
        """Risk snapshots travel through the internal ``risk-snapshots`` topic to the sink
        agents, so ClickHouse inserts are driven (and deduplicated) by Kafka offsets. Rows are
        sent as ClickHouse Native blocks of up to ``chunk`` rows (:mod:`streams.rowblock`; a
        market move over 100k accounts is ~150 messages)."""
        for table, cols in (("risk_snapshots", out.snapshots), ("exposures", out.exposures)):
            self._send_columns(table, cols, chunk)
        if out.stress:
            rows = [[_ms_of(r[0]), *r[1:]] for r in out.stress]
            self._send(self.s.topic("risk-snapshots"), self.worker_id.encode(),
                       orjson.dumps({"stress": rows}, option=orjson.OPT_SERIALIZE_NUMPY))

    def _send_columns(self, table: str, cols: dict, chunk: int) -> None:
        """Rows the table cannot hold (a non-finite figure) are dead-lettered here, with the
        reason, instead of reaching ClickHouse (which would store a NaN as it is)."""
        topic = self.s.topic("risk-snapshots")
        msgs, rejected = rowblock.encode(table, cols, chunk)
        for key, value in msgs:
            self._send(topic, key, value)
        for row, why in rejected:
            self._reject_row(table, row, why)

    async def _sink_loop(self, feed, handle) -> None:
        """A sink agent: batches of up to ``sink_batch_rows`` records (waiting up to
        ``sink_batch_ms`` to fill, for fewer and larger inserts), stored, then acked."""
        s = self.s
        while True:
            epoch, batch = await feed.take(s.sink_batch_rows, within=s.sink_batch_ms / 1000.0)
            if epoch != feed.epoch:
                continue  # revoked meanwhile: re-read from the committed offsets
            t0 = time.perf_counter()
            try:
                await handle(batch)
            except Exception as exc:  # noqa: BLE001 - never skip past an unstored batch
                log.exception("unexpected error in the sink; stopping the worker")
                await self.app.crash(exc)
                return
            self.timings["sink"] += time.perf_counter() - t0
            if epoch == feed.epoch:
                self.app.consumer.ack_records(batch)

    async def sink_snapshot_batch(self, batch) -> None:
        await self.sink.write_messages([m.value for m in batch], _source(batch))

    async def sink_event_batch(self, batch) -> None:
        from .store import event_row
        rows = []
        for m in batch:
            try:
                rows.append(event_row(self.codec.decode(m.value, expect="MarginEvent")[1]))
            except SchemaError as e:
                log.error("undecodable margin event %s[%d]@%d: %s", m.topic, m.partition,
                          m.offset, e)
        await self.sink.write("margin_events", rows, _source(batch))

    async def _sink_rejected(self, table, row, error) -> None:
        self._reject_row(table, row, error)
        await self.out.flush()

    def _reject_row(self, table, row, error) -> None:
        """A row ClickHouse cannot hold, to the dead-letter topic (its values as JSON)."""
        value = json.dumps([_jsonable(v) for v in row]).encode()
        self._dead_letter(Rejected(f"clickhouse:{table}", 0, -1, "SinkRejected", error),
                          value=value)

    def _recovered(self) -> bool:
        try:
            return self.app.tables.recovery.completed.is_set()
        except AttributeError:  # before the app has started its table manager
            return False

    def ready(self) -> bool:
        """Serving: reference data loaded, the accounts table recovered from its changelog and
        loaded into the engine (a readiness probe; /metrics answers earlier). A sink process:
        its store opened and migrated."""
        if not self.margin_role:
            return self.sink.opened
        return self.ref_ready.is_set() and self._recovered() and not self.needs_sync

    def _gc_callback(self, phase, info) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_seconds[info["generation"]] += time.perf_counter() - self._gc_t0

    def prometheus(self) -> str:
        """Prometheus text exposition of the worker's counters and gauges."""
        lines = []
        for k, v in self.metrics.items():
            lines += [f"# TYPE riskpipe_{k}_total counter", f"riskpipe_{k}_total {v}"]
        if self.margin_role:  # account records taken out of event-time order (wait bound)
            lines += ["# TYPE riskpipe_unaligned_releases_total counter",
                      f"riskpipe_unaligned_releases_total {self.feed.forced}"]
            # the account table's changelog replays (streams/feed.py replay_changelog): how
            # long a restart or a partition taking over waited for its state
            c = self.app.consumer
            lines += ["# TYPE riskpipe_changelog_replayed_records_total counter",
                      f"riskpipe_changelog_replayed_records_total "
                      f"{getattr(c, 'replayed_total', 0)}"]
            last = getattr(c, "last_replay_seconds", None)
            if last is not None:
                lines += ["# TYPE riskpipe_last_recovery_seconds gauge",
                          f"riskpipe_last_recovery_seconds {last:.3f}"]
        lines.append("# TYPE riskpipe_stage_seconds_total counter")
        for k, v in self.timings.items():
            lines.append(f'riskpipe_stage_seconds_total{{stage="{k}"}} {v:.3f}')
        states = {}
        for st in self.processor.state.values():
            states[st] = states.get(st, 0) + 1
        lines.append("# TYPE riskpipe_ready gauge")  # reference data loaded, table recovered
        lines.append(f"riskpipe_ready {int(self.ready())}")
        lines.append("# TYPE riskpipe_gc_seconds_total counter")
        for g, v in enumerate(self.gc_seconds):
            lines.append(f'riskpipe_gc_seconds_total{{generation="{g}"}} {v:.3f}')
        lines.append("# TYPE riskpipe_accounts gauge")
        from .processor import STATE_NAMES
        for i, name in enumerate(STATE_NAMES):
            lines.append(f'riskpipe_accounts{{state="{name}"}} {states.get(i, 0)}')
        lines.append("# TYPE riskpipe_input_events_total counter")
        for t, n in sorted(self.events_by_topic.items()):
            lines.append(f'riskpipe_input_events_total{{topic="{t}"}} {n}')
        lines += self.latency.text()
        if self.margin_role:
            lines += self.fetch_lag.text()
        if self.sink is not None:
            lines += self.sink_latency.text()
            lines.append("# TYPE riskpipe_sink_rows_total counter")
            for t, n in self.sink.inserted.items():
                lines.append(f'riskpipe_sink_rows_total{{table="{t}"}} {n}')
            lines.append(f"riskpipe_sink_pending_rows {self.sink.pending}")
            lines.append(f"riskpipe_sink_retries_total {self.sink.retries}")
            lines.append(f"riskpipe_sink_up {0 if self.sink.down else 1}")
        return "\n".join(lines) + "\n"

    # -- broadcast reader -----------------------------------------------------------------------
    async def run_broadcast(self) -> None:
        s = self.s
        topics = {s.topic("instruments"): "Instrument", s.topic("risk-params"): "RiskParams",
                  s.topic("quotes"): "Quote"}
        consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    **_aiokafka_security(s))
        await consumer.start()
        wake_after_fetch(consumer._fetcher)  # the same race could hold quotes (and ticks) 200 ms
        self._bc_consumer = consumer
        try:
            tps = []
            parts = await asyncio.get_running_loop().run_in_executor(
                None, _partitions, s, list(topics))
            for t in topics:
                tps += [TopicPartition(t, p) for p in parts[t]]
            consumer.assign(tps)
            for tp in tps:
                self._applied.setdefault(tp, 0)
            await consumer.seek_to_beginning(*tps)
            # reference data first, up to its current end, so quotes find their instruments;
            # then the quotes up to their current end, so no account is margined on a partial
            # market at start-up
            quotes = [tp for tp in tps if tp.topic == s.topic("quotes")]
            ref = [tp for tp in tps if tp.topic != s.topic("quotes")]
            consumer.pause(*quotes)
            await self._read_to_end(consumer, ref, topics)
            consumer.resume(*quotes)
            consumer.pause(*ref)
            await self._read_to_end(consumer, quotes, topics)
            if self.processor.dirty_underlyings:
                self.processor.on_market_tick()  # no accounts yet: just builds the risk set
            consumer.resume(*tps)
            self.ref_ready.set()
            log.info("reference data loaded: %d instruments, params version %d; reading quotes",
                     len(self.processor.universe), self.processor.params.version)
            last_tick = 0.0
            interval = s.coalesce_ms / 1000.0
            while True:
                got = await consumer.getmany(timeout_ms=max(1, s.coalesce_ms // 2),
                                             max_records=20_000)
                await self.apply_broadcast(got, topics)
                now = time.monotonic()
                if self.processor.dirty_underlyings and (now - last_tick >= interval or
                                                          not got):
                    last_tick = now
                    await self.market_tick()
        finally:
            await consumer.stop()

    async def _read_to_end(self, consumer, tps, topics) -> None:
        ends = await consumer.end_offsets(tps)
        while True:
            pos = [await consumer.position(tp) for tp in tps]
            if all(p >= ends[tp] for p, tp in zip(pos, tps)):
                return
            got = await consumer.getmany(timeout_ms=200, max_records=20_000)
            await self.apply_broadcast(got, topics)

    async def apply_broadcast(self, got, topics) -> None:
        proc = self.processor
        rejected = []
        affected: set[str] = set()
        owned = self.owned_partitions()

        def reject(tp, m, e) -> None:
            # every worker reads broadcast topics; the owner of the matching partition number
            # reports the dead letter so it is recorded once
            if (m.partition % self.s.partitions) in owned:
                rejected.append((Rejected(tp.topic, m.partition, m.offset, type(e).__name__,
                                          str(e)), m))

        def apply(tp, m, kind, rec) -> None:
            try:
                if kind == "Quote":
                    proc.apply_quote(rec)
                elif kind == "Instrument":
                    proc.apply_instrument(rec)
                else:
                    affected.update(proc.apply_risk_params(rec))
            except E.EngineError as e:
                reject(tp, m, e)

        # reference data first, then quotes: an exchange lists an instrument and quotes it at
        # once, and the two topics' records may come in one fetch in either order
        order = {"Instrument": 0, "RiskParams": 1, "Quote": 2}
        released = False
        for tp, msgs in sorted(got.items(), key=lambda kv: order[topics[kv[0].topic]]):
            kind = topics[tp.topic]
            if kind == "Quote" and not released:
                released = True
                self._release_held_quotes(apply)
            if msgs:
                self._applied[tp] = msgs[-1].offset + 1
                self.events_by_topic[tp.topic] = self.events_by_topic.get(tp.topic, 0) + \
                    len(msgs)
            for m in msgs:
                try:
                    _, rec = self.codec.decode(m.value, expect=kind)
                except SchemaError as e:
                    reject(tp, m, e)
                    continue
                if kind == "Quote" and rec["instrument"] not in proc.universe:
                    self._held_quotes.setdefault(rec["instrument"], []).append(
                        (time.monotonic(), tp, m, rec))
                    continue
                apply(tp, m, kind, rec)
        if not released:
            self._release_held_quotes(apply)
        self._expire_held_quotes(reject)
        if rejected:
            for r, m in rejected:
                self._dead_letter(r, m)
            await self.out.flush()
        if affected:
            async with self.work_lock:
                await self.sync()
                proc.risk_set()
                await self.emit(proc.remargin_underlyings(sorted(affected), trigger="PARAMS"))

    def _release_held_quotes(self, apply) -> None:
        """Apply, in arrival order, the held quotes whose instrument is now listed."""
        for inst in [i for i in self._held_quotes if i in self.processor.universe]:
            for _, tp, m, rec in self._held_quotes.pop(inst):
                apply(tp, m, "Quote", rec)

    def _expire_held_quotes(self, reject) -> None:
        """Dead-letter quotes held longer than :data:`QUOTE_HOLD_S` (their instrument never
        came), then the oldest beyond :data:`QUOTE_HOLD_MAX` held in all. Each instrument's
        quotes are held in arrival order, so its oldest are at the front."""
        held = self._held_quotes

        def drop(inst) -> None:
            _, tp, m, _ = held[inst].pop(0)
            if not held[inst]:
                del held[inst]
            reject(tp, m, E.UnknownInstrument(f"unknown instrument {inst!r}: no Instrument "
                                              f"record within {QUOTE_HOLD_S:g} s of the quote"))
        cut = time.monotonic() - QUOTE_HOLD_S
        for inst in list(held):
            while inst in held and held[inst][0][0] < cut:
                drop(inst)
        excess = sum(map(len, held.values())) - QUOTE_HOLD_MAX
        for _ in range(max(0, excess)):
            drop(min(held, key=lambda i: held[i][0][0]))

    async def market_tick(self) -> None:
        """Re-margin the holders of the moved underlyings with the event loop free for account
        batches meanwhile: the margin kernel runs on a thread of its own (it releases the GIL)
        over a :class:`engine.book.MarginJob`, then states, events and snapshots are derived in
        steps (:meth:`RiskProcessor.tick_steps`) with the work lock released in between. On
        the event loop, the kernel of 20,000 accounts of 15 positions held account batches
        for ~8 ms, ten times a second in a moving market.

        The kernel reads the book as account batches change it. Each account is margined at
        the market of the tick (quotes are applied by the same task, after the tick); an
        account written meanwhile was margined at that market by its own batch, after the
        write, so its tick result is dropped (:meth:`RiskProcessor.finish_tick_job`). Outputs
        are queued in order with everything else and acknowledged in the background like an
        account batch's, once for the whole tick (:meth:`acknowledge_later`). If
        partitions move or the risk set changes meanwhile, the rest of the tick is left and
        the underlyings are marked moved again, so the next tick re-margins the accounts this
        worker then holds."""
        proc = self.processor
        async with self.work_lock:
            await self.sync()
            tick = proc.start_tick()
            if tick is None:
                return
            unds, rows, t = tick
            self.metrics["market_ticks"] += 1
            if rows.size == 0:  # no holder here: nothing to margin, send or acknowledge
                return
            job = proc.tick_job(rows)
        epoch = self.feed.epoch if self.feed is not None else 0
        t0 = time.perf_counter()
        res = await asyncio.get_running_loop().run_in_executor(self._tick_pool, job.run)
        self.timings["tick_kernel"] += time.perf_counter() - t0
        sent = Output()  # the tick's margin events: out of the outboxes once acknowledged
        for lo, hi in proc.tick_steps(rows.size):
            async with self.work_lock:
                out = None
                if not (self.stopping or self.needs_sync or
                        (self.feed is not None and self.feed.epoch != epoch)):
                    t0 = time.perf_counter()
                    out = proc.finish_tick_job(job, res, lo, hi, "QUOTE", t)
                    self.timings["tick"] += time.perf_counter() - t0
                if out is None:
                    proc.dirty_underlyings.update(unds)
                    break
                await self.queue_outputs(out)
                sent.events += out.events
            await asyncio.sleep(0)
        # one acknowledgement for the whole tick, in order after the unit before it (a wait per
        # step held the work lock for a broker round trip ten times a tick)
        async with self.work_lock:
            await self.acknowledge_queued(sent)


def _partitions(s: Settings, topics) -> dict[str, list[int]]:
    """Partition numbers of ``topics`` (they are created by ``riskpipe init`` / the worker)."""
    from confluent_kafka.admin import AdminClient
    md = AdminClient(s.kafka_conf()).list_topics(timeout=30)
    out = {}
    for t in topics:
        tm = md.topics.get(t)
        if tm is None or tm.error is not None or not tm.partitions:
            raise RuntimeError(f"topic {t} does not exist; run `riskpipe init`")
        out[t] = sorted(tm.partitions)
    return out


def _ms_of(ts) -> int:
    return int(ts.timestamp() * 1000) if isinstance(ts, datetime) else int(ts)


def _source(batch) -> str:
    """topic/partition/offset ranges of a batch: the sink's deduplication identity."""
    ranges: dict[tuple, list] = {}
    for m in batch:
        r = ranges.setdefault((m.topic, m.partition), [m.offset, m.offset])
        r[0], r[1] = min(r[0], m.offset), max(r[1], m.offset)
    return ",".join(f"{t}[{p}]{lo}-{hi}" for (t, p), (lo, hi) in sorted(ranges.items()))


def _jsonable(v):
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    return v


def dead_letter(r: Rejected, m=None) -> dict:
    key = getattr(m, "key", None)
    value = getattr(m, "value", None)
    return {"topic": r.topic, "partition": r.partition, "offset": r.offset,
            "key": bytes(key) if key is not None else None,
            "value": bytes(value) if value is not None else None,
            "error_type": r.error_type, "reason": r.reason[:4000],
            "ts": datetime.now(timezone.utc)}


def _aiokafka_security(s: Settings) -> dict:
    kw = {"security_protocol": s.kafka_security_protocol}
    if s.kafka_sasl_mechanism:
        kw.update(sasl_mechanism=s.kafka_sasl_mechanism,
                  sasl_plain_username=s.kafka_sasl_username,
                  sasl_plain_password=s.kafka_sasl_password.get_secret_value()
                  if s.kafka_sasl_password else None)
    if s.kafka_security_protocol in ("SSL", "SASL_SSL"):
        import ssl
        kw["ssl_context"] = ssl.create_default_context(cafile=s.kafka_ssl_cafile)
    return kw


def _faust_credentials(s: Settings):
    import ssl
    ctx = ssl.create_default_context(cafile=s.kafka_ssl_cafile) \
        if s.kafka_security_protocol.endswith("SSL") else None
    if s.kafka_sasl_mechanism:
        return faust.SASLCredentials(
            username=s.kafka_sasl_username,
            password=s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password else None,
            mechanism=s.kafka_sasl_mechanism, ssl_context=ctx)
    return faust.SSLCredentials(ctx)


def create_app(settings: Settings, sink=None) -> Pipeline:
    """Build a worker: ``create_app(settings).app`` is the Faust app."""
    return Pipeline(settings, sink)
