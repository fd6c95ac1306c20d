"""The worker's risk state and its event handlers, free of Kafka and Faust.

Agents decode records and hand them here; this module applies them to the engine (instrument
universe, market, account book), re-margins in vectorised calls and returns what to emit:
``MarginEvent`` records for state transitions, risk snapshot rows for the results sink, and dead
letters for records the engine rejects. Keeping it I/O-free lets the same code run in the Faust
worker, in benchmarks and in tests.

Idempotency: every account remembers the highest input offset applied per topic (its topics are
co-partitioned, so one partition number covers them all). A replay after a crash skips records at
or below it, so positions are never double-counted, sequence numbers continue where the
changelog left them, and the same transition gets the same event id ``<account>:<seq>``.
"""
from __future__ import annotations

import logging
import math
import operator
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import orjson

import engine as E
from engine.states import MarginState

log = logging.getLogger(__name__)

_KIND = {"SPOT": E.Kind.SPOT, "PERPETUAL": E.Kind.PERPETUAL, "FUTURE": E.Kind.FUTURE,
         "CALL": E.Kind.CALL, "PUT": E.Kind.PUT}
_SETTLE = {"LINEAR": E.Settlement.LINEAR, "INVERSE": E.Settlement.INVERSE}
STATE_NAMES = [s.name for s in MarginState]


def _ms(ts) -> int:
    """Epoch milliseconds of a decoded timestamp (``datetime``, or already the number)."""
    if ts.__class__ is int:
        return ts
    if isinstance(ts, datetime):
        return int(ts.timestamp() * 1000)
    return int(ts)


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


@dataclass
class Rejected:
    """An input the engine refused: becomes a DeadLetter."""
    topic: str
    partition: int
    offset: int
    error_type: str
    reason: str


SNAPSHOT_COLUMNS = ("account", "ts", "state", "equity", "im", "mm", "margin_ratio", "shortfall",
                    "worst_underlying", "worst_scenario", "worst_pnl", "trigger",
                    "params_version", "seq")
EXPOSURE_COLUMNS = ("account", "underlying", "ts", "delta", "gamma", "vega", "theta")


def _extend_cols(dst: dict, src: dict) -> None:
    """Append columns (lists of text, numpy arrays of numbers) to ``dst``."""
    for k, v in src.items():
        cur = dst.get(k)
        if cur is None:
            dst[k] = v
        else:
            dst[k] = _concat([cur, v])


def _concat(parts: list):
    """One column from pieces: a list when they are lists (text), else one numpy array (of
    the pieces' own dtype: empty pieces are left out, as an empty list would read as floats)."""
    parts = [p for p in parts if len(p)] or parts[:1]
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, list) for p in parts):
        out: list = []
        for p in parts:
            out += p
        return out
    return np.concatenate([np.asarray(p) for p in parts])


def n_rows(cols: dict) -> int:
    return len(cols.get("account", ()))


@dataclass
class Output:
    events: list[dict] = field(default_factory=list)      # MarginEvent records
    # risk snapshot and exposure rows, column-oriented (name -> list), ts in epoch ms
    snapshots: dict[str, list] = field(default_factory=dict)
    exposures: dict[str, list] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)
    stress: list[list] = field(default_factory=list)      # exchange stress rows
    touched: set[str] = field(default_factory=set)        # accounts whose stored state changed

    def extend(self, other: "Output") -> None:
        self.events += other.events
        _extend_cols(self.snapshots, other.snapshots)
        _extend_cols(self.exposures, other.exposures)
        self.rejected += other.rejected
        self.stress += other.stress
        self.touched |= other.touched


class RiskProcessor:
    def __init__(self, thresholds: E.StateThresholds | None = None,
                 snapshot_interval_ms: int = 1000, clock=time.time, tick_interval_ms: int = 0):
        self.universe = E.Universe()
        self.params = E.RiskParams()
        self.market = E.Market(self.universe, self.params)
        self.book = E.AccountBook(self.universe)
        self.thresholds = thresholds or E.StateThresholds()
        self.snapshot_interval_ms = snapshot_interval_ms
        self.clock = clock
        self.state: dict[str, int] = {}
        self.seq: dict[str, int] = {}
        self.offsets: dict[str, dict[str, int]] = {}
        self.partition: dict[str, int] = {}
        # outbox: margin events recorded in the account's stored state before they are sent,
        # so a crash between the two re-sends them with identical content (never loses one)
        self.outbox: dict[str, list[dict]] = {}
        self._last_snap = np.zeros(0)  # per book row: processing time of the last snapshot
        self._state_arr = np.zeros(0, dtype=np.int8)  # per book row: mirrors self.state
        self._seq_arr = np.zeros(0, dtype=np.int64)   # per book row: mirrors self.seq
        self._rs: E.RiskSet | None = None
        self._stale = True
        self.dirty_underlyings: set[str] = set()
        self.quote_ts: dict[str, int] = {}
        self.market_version = 0
        self._tick_gaps: list[float] = []  # processing-time gaps (ms) between the last ticks
        self._tick_last = 0.0
        self._tick_share = 1.0  # the current tick's share of periodic snapshots (see start_tick)
        self.tick_interval_ms = tick_interval_ms  # cadence assumed before two ticks (0: none)

    # -- reference data -------------------------------------------------------------------
    def apply_instrument(self, rec: dict) -> None:
        expiry = rec.get("expiry")
        inst = E.Instrument(rec["id"], _KIND[rec["kind"]], rec.get("underlying"),
                            _SETTLE[rec["settlement"]], float(rec["multiplier"]),
                            rec.get("strike"), None if expiry is None else _ms(expiry),
                            float(rec.get("lot_size") or 0.0))
        self.universe.add(inst)
        self._stale = True

    def apply_risk_params(self, rec: dict) -> list[str]:
        """Update one underlying's parameters (or the default); returns affected underlyings."""
        up = E.UnderlyingParams(
            scan_range=rec["scan_range"], grid=rec["grid"], vol_shock_base=rec["vol_shock_base"],
            vol_shock_power=rec["vol_shock_power"], dte_floor_days=rec["dte_floor_days"],
            short_option_min=rec["short_option_min"], concentration_rate=rec["concentration_rate"],
            concentration_liquidity=rec["concentration_liquidity"], basis_rate=rec["basis_rate"],
            mm_ratio=rec["mm_ratio"], rate=rec["rate"])
        u = rec["underlying"]
        p = self.params
        haircuts = dict(p.haircuts)
        if rec.get("haircut") is not None and u != "*":
            haircuts[u] = float(rec["haircut"])
        if u == "*":
            new = E.RiskParams(version=int(rec["version"]), default=up,
                               underlyings=p.underlyings, haircuts=haircuts,
                               default_haircut=p.default_haircut, thresholds=p.thresholds,
                               joint_scenarios=p.joint_scenarios)
            affected = [x for x in self.universe.underlyings if x not in p.underlyings]
        else:
            ups = dict(p.underlyings)
            ups[u] = up
            new = E.RiskParams(version=int(rec["version"]), default=p.default, underlyings=ups,
                               haircuts=haircuts, default_haircut=p.default_haircut,
                               thresholds=p.thresholds, joint_scenarios=p.joint_scenarios)
            affected = [u]
        self.params = new
        self.market.set_params(new)
        self._stale = True
        return [a for a in affected if a in self.universe.underlyings]

    def apply_quote(self, rec: dict) -> None:
        inst_id = rec["instrument"]
        inst = self.universe.instruments[self.universe.row(inst_id)]
        self.market.set_quote(inst_id, rec["mark"], rec.get("mark_iv"),
                              index=rec["index_price"])
        u = inst.underlying or inst_id
        self.dirty_underlyings.add(u)
        self.quote_ts[u] = max(self.quote_ts.get(u, 0), _ms(rec["ts"]))
        self._stale = True

    # -- risk set -------------------------------------------------------------------------
    def market_time_ms(self) -> int:
        """Valuation time: the event time of the latest quote (wall clock before any quote).

        Using event time rather than the wall clock makes margin numbers a pure function of
        the input records, so a replay or a second worker computes them to the last bit."""
        return max(self.quote_ts.values()) if self.quote_ts else int(self.clock() * 1000)

    def risk_set(self, now_ms: int | None = None) -> E.RiskSet:
        if self._stale or self._rs is None or self._rs.value.shape[0] != len(self.universe):
            now = self.market_time_ms() if now_ms is None else now_ms
            self._rs = self.market.risk_set(now, strict=False)
            self._stale = False
            self.market_version += 1
        return self._rs

    # -- account state persistence ----------------------------------------------------------
    def account_record_bytes(self, acct: str) -> bytes:
        """The account's changelog record, encoded (format 2, read by
        :func:`account_from_bytes`): the byte 2, the length of a JSON head (4 bytes,
        little-endian), the head (partition, state, sequence, applied offsets, outbox, and the
        instruments held, as ``pi``), then the positions' quantities and costs as float64
        (little-endian, one run each).

        Why not all JSON (format 1, still read): persisting accounts is about a third of the
        account path's time per event, and formatting their floats as text a quarter of that
        (an account of 15 positions: 5.9 us as JSON, 4.4 us so, in-process). Raw float64 is
        also exact by construction."""
        names, qty, cost = self.book.position_bytes(acct)
        out = self.outbox.get(acct)
        head = orjson.dumps({"p": self.partition.get(acct, -1), "pi": names,
                             "st": self.state.get(acct, 0), "seq": self.seq.get(acct, 0),
                             "off": self.offsets.get(acct, {}),
                             "out": [event_to_json(e) for e in out] if out else []},
                            option=orjson.OPT_SERIALIZE_NUMPY)
        return b"".join((_RECORD_V2, len(head).to_bytes(4, "little"), head, qty, cost))

    def account_record(self, acct: str) -> dict:
        out = self.outbox.get(acct)
        return {"p": self.partition.get(acct, -1),
                "pos": self.book.position_tuples(acct),  # tuples encode as JSON arrays
                "st": self.state.get(acct, 0), "seq": self.seq.get(acct, 0),
                "off": self.offsets.get(acct, {}),
                "out": [event_to_json(e) for e in out] if out else []}

    def load_account(self, acct: str, rec: dict) -> None:
        self._register_assets(i for i, _, _ in rec["pos"])
        self.book.load(acct, [E.Position(i, q, c) for i, q, c in rec["pos"]])
        self._load_head(acct, rec)

    def _register_assets(self, names) -> None:
        """Register each of ``names`` the universe does not list: a balance in an asset first
        seen in a recovered record, registered as a deposit in it would be."""
        for inst in names:
            if inst not in self.universe:
                self.universe.add_underlying(inst)

    def load_account_parts(self, acct: str, rec: dict, names: list, qty: np.ndarray,
                           cost: np.ndarray) -> None:
        """:meth:`load_account` from :func:`account_parts` (a restart loads every recovered
        account this way: the positions written as one slice, see ``AccountBook.load_arrays``;
        the same book, state and outbox)."""
        uni = self.universe
        try:
            rows = uni.rows(names)
        except E.UnknownInstrument:
            self._register_assets(names)
            rows = uni.rows(names)
        self.book.load_arrays(acct, rows, qty, cost)
        self._load_head(acct, rec)

    def _load_head(self, acct: str, rec: dict) -> None:
        """An account record's state, sequence, offsets, partition and outbox."""
        self.state[acct] = rec["st"]
        self.seq[acct] = rec["seq"]
        r = self._ensure_rows(self.book.row(acct))
        self._state_arr[r] = rec["st"]
        self._seq_arr[r] = rec["seq"]
        # its last snapshot was written before the restart or the move: counted as now, so a
        # recovered book's first market tick does not write a snapshot of every account at once
        # (they resume spread over the window; a state change still writes one at once)
        self._last_snap[r] = self.clock() * 1000
        self.offsets[acct] = dict(rec["off"])
        self.partition[acct] = rec["p"]
        self.outbox[acct] = [event_from_json(e) for e in rec.get("out", [])]
        self._stale = True

    def drop_accounts(self, keep) -> None:
        """Forget accounts not in ``keep`` (partitions moved to another worker)."""
        keep = set(keep)
        gone = [a for a in self.book.ids if a not in keep and self.book.count[
            self.book.row(a)] > 0]
        for a in gone:
            self.book.load(a, [])
            r = self._ensure_rows(self.book.row(a))
            self._state_arr[r] = 0
            self._seq_arr[r] = 0
            for d in (self.state, self.seq, self.offsets, self.partition, self.outbox):
                d.pop(a, None)

    # -- account events ---------------------------------------------------------------------
    def apply_account_events(self, events) -> Output:
        """Apply trades / collateral changes and re-margin after every event of an account.

        ``events``: iterable of (record name, record, topic, partition, offset).

        Events are processed in *rounds*: round k holds the k-th event of every account in the
        batch, and each round ends with one vectorised margin call over the accounts it
        touched. An account is therefore evaluated after each of its events, exactly as if
        events arrived one by one, so the margin events emitted do not depend on how the input
        happened to be batched (a restart that batches differently emits the same ids with the
        same content), while accounts are still margined together.
        """
        out = Output()
        rounds: list[list] = []
        seen_in_batch: dict[str, int] = {}
        for ev in events:
            acct = ev[1]["account"]
            k = seen_in_batch.get(acct, 0)
            seen_in_batch[acct] = k + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(ev)
        for rnd in rounds:
            out.extend(self._apply_round(rnd))
        return out

    def _apply_round(self, events) -> Output:
        """Apply one round (at most one event per account) and re-margin the accounts it
        changed in one call."""
        out = Output()
        touched = out.touched
        accts: list[str] = []      # accounts applied, in order, with their trigger, time and
        triggers: list[str] = []   # source record (one each: a round holds one event per
        ts_ms: list[int] = []      # account), the source as (topic, partition, offset): a
        sources: list[tuple] = []  # margin event's dicts are made for the few that change state
        offsets, partitions, book = self.offsets, self.partition, self.book
        # replays set aside first; the round's fills and balance changes then go to the book
        # in one call each (its accounts are distinct, so the order of trades and collateral
        # changes between accounts does not matter), and outcomes are taken in input order
        todo = []
        fills = []
        changes = []
        for ev in events:
            rec = ev[1]
            acct = rec["account"]
            seen = offsets.get(acct)
            if seen is None:
                seen = offsets[acct] = {}
            elif ev[4] <= seen.get(ev[2], -1):
                continue  # replay of an already applied record
            if ev[0] == "Trade":
                fills.append((acct, rec["instrument"], rec["quantity"], rec["price"],
                              rec.get("fee") or 0.0))
            else:
                changes.append((acct, rec["asset"], rec["amount"]))
            todo.append((ev, seen))
        failed = dict(book.apply_trades(fills))
        failed_c = dict(book.apply_collaterals(changes))
        f = c = 0
        for (name, rec, topic, partition, offset), seen in todo:
            acct = rec["account"]
            if name == "Trade":
                err = failed.get(f)
                f += 1
                trigger = "TRADE"
            else:
                err = failed_c.get(c)
                c += 1
                trigger = "COLLATERAL"
            seen[topic] = offset
            touched.add(acct)
            if err is not None:
                out.rejected.append(Rejected(topic, partition, offset, type(err).__name__,
                                             str(err)))
                partitions.setdefault(acct, partition)
                continue
            partitions[acct] = partition
            accts.append(acct)
            triggers.append(trigger)
            ts = rec["ts"]
            ts_ms.append(ts if ts.__class__ is int else _ms(ts))
            sources.append((topic, partition, offset))
        if accts:
            out.extend(self._remargin(book.rows_of(accts), triggers, sources, ts_ms))
        return out

    def remargin_underlyings(self, underlyings, trigger: str = "QUOTE") -> Output:
        """Re-margin every local account holding any of ``underlyings`` in one call."""
        rows, t = self.holders(underlyings)
        return self.remargin_rows(rows, trigger, t)

    def holders(self, underlyings) -> tuple[np.ndarray, int]:
        """Book rows of the accounts holding any of ``underlyings`` (sorted) and the market
        time of those underlyings (their latest quote)."""
        none = np.zeros(0, dtype=np.int64)
        if not underlyings or len(self.book) == 0:
            return none, 0
        held = [u for u in underlyings if u in self.universe.underlyings]
        if not held:
            return none, 0
        rows = self.book.rows_holding_any(held)
        t = max([self.quote_ts.get(u, 0) for u in underlyings] + [0]) or \
            int(self.clock() * 1000)
        return rows, t

    def remargin_rows(self, rows: np.ndarray, trigger: str, t: int) -> Output:
        """Re-margin the accounts at book ``rows`` (a market move or a parameter change at
        market time ``t``)."""
        if rows.size == 0:
            return Output()
        return self._remargin(rows, [trigger] * rows.size, None, [t] * rows.size)

    def start_tick(self) -> tuple[list[str], np.ndarray, int] | None:
        """Begin a market tick: risk arrays recomputed once for every quote received since
        the last tick; returns the moved underlyings, the rows of their holders and the
        market time (None if nothing moved). The caller re-margins the rows, in one call
        (:meth:`on_market_tick`) or in steps (the worker)."""
        dirty, self.dirty_underlyings = self.dirty_underlyings, set()
        if not dirty:
            return None
        self.risk_set()
        unds = sorted(dirty)
        rows, t = self.holders(unds)
        self._tick_share = self._snapshot_share(self.clock() * 1000)
        return unds, rows, t

    def _snapshot_share(self, now: float) -> float:
        """The largest share of a tick's accounts that may write a periodic snapshot (state
        changes always write one): twice what the market's recent tick cadence makes due.

        Why: periodic snapshots are spread over the window (:func:`_window_passed`), so a tick
        every ``g`` ms finds about ``g / interval`` of the book due. But after a quiet spell
        (no quote for longer than the window) every account is due at once, and the first move
        wrote a row for the whole book in one tick (20,000 snapshot and 40,000 exposure rows: a
        burst for the worker, the broker and the sink at once, and a backlog of live trades
        behind it). The cadence is the lower median of the last three gaps between ticks: the
        quiet spell's own gap is an outlier among them, and so is one short gap (a tick re-run
        at once), so neither sets the share; a steadily slow market is never held back (ticks
        every half window or slower: no limit). The due accounts over the share go oldest
        snapshot first; the backlog is gone within about one window.

        Before a second tick there is no gap to go by: the worker's coalescing interval
        (``tick_interval_ms``) stands in for the cadence. Without it a restarted worker's first
        tick, a second or more after it loaded its accounts, wrote a row for every one of them
        (20,000 snapshot and 40,000 exposure rows at once; in one of two traced bench restarts,
        27 of the first phase's 35 samples over 50 ms came in its first 100 ms)."""
        gaps = self._tick_gaps
        if self._tick_last:
            gaps.append(now - self._tick_last)
            del gaps[:-3]
        self._tick_last = now
        if self.snapshot_interval_ms <= 0 or not (gaps or self.tick_interval_ms > 0):
            return 1.0
        cadence = sorted(gaps)[(len(gaps) - 1) // 2] if gaps else self.tick_interval_ms
        return min(1.0, 2.0 * cadence / self.snapshot_interval_ms)

    def _tick_snapshots(self, rows: np.ndarray, new: np.ndarray, prev: np.ndarray) -> np.ndarray:
        """Which of a tick's ``rows`` (all, or a step's) write a snapshot: each state change,
        and the periodic ones due up to the tick's share of them, oldest first (a worker's tick
        chooses within each of its steps)."""
        last = self._last_snap[rows]
        due = _window_passed(rows, last, self.clock() * 1000, self.snapshot_interval_ms)
        if self._tick_share < 1.0:
            limit = math.ceil(self._tick_share * rows.size)
            cand = np.flatnonzero(due)
            if cand.size > limit:
                keep = cand[np.argsort(last[cand], kind="stable")[:limit]]
                due = np.zeros_like(due)
                due[keep] = True
        return due | (new != prev)

    def tick_job(self, rows: np.ndarray) -> E.MarginJob:
        """The margin kernel of a tick's ``rows``, to run off the event loop
        (:meth:`E.MarginJob.run`) while account batches keep applying; its results are turned
        into outputs by :meth:`finish_tick_job`."""
        return self.book.margin_job(self.risk_set(), rows)

    def finish_tick_job(self, job: E.MarginJob, res, lo: int, hi: int, trigger: str,
                        t: int) -> Output | None:
        """States, margin events and snapshots of the job's rows ``lo:hi`` from its result
        ``res``. Rows written since the job was made are left out: their own batch margined
        them at the same market, after the write. None if the market changed meanwhile (the
        results are stale: the caller re-runs the tick)."""
        if self._stale or self._rs is not job.rs:
            return None
        idx = lo + np.flatnonzero(self.book.unchanged(job, lo, hi))
        # only the accounts with something to write (a state change, or a snapshot due) go on:
        # most of a tick's accounts have neither, and building their output columns only to
        # drop them took two thirds of a tick's time on the event loop
        rows = job.rows[idx]
        self._ensure_rows(0)
        prev = self._state_arr[rows]
        new = E.classify(prev, res.equity[idx], res.im[idx], res.mm[idx], self.thresholds)
        idx = idx[self._tick_snapshots(rows, new, prev)]
        if idx.size == 0:
            return Output()
        part = res if idx.size == res.rows.size else res.take(idx)
        n = idx.size
        return self._remargin(part.rows, [trigger] * n, None, [t] * n, res=part,
                              snap=np.ones(n, dtype=np.bool_))

    @staticmethod
    def tick_steps(n: int, min_step: int = 10_000, max_steps: int = 10) -> list[tuple[int, int]]:
        """The worker's steps through a tick's ``n`` rows, as (lo, hi) bounds: ``min_step``
        accounts each, or more so that a tick takes at most ``max_steps``. A step holds the
        event loop ~1 ms per 10,000 accounts when few are due a snapshot (each step also has a
        fixed cost of ~0.4 ms: 2,000-account steps made a 20,000-account tick 6.8 ms instead
        of 2.4 ms), up to ~9 ms when all are (a restart's first tick over 100,000)."""
        step = max(min_step, -(-n // max_steps))
        return [(lo, min(lo + step, n)) for lo in range(0, n, step)]

    def on_market_tick(self) -> Output:
        """Called at most every coalescing interval: recompute risk arrays once for all ticks
        received since the last call and re-margin holders of the moved underlyings."""
        tick = self.start_tick()
        if tick is None:
            return Output()
        _, rows, t = tick
        if rows.size == 0:
            return Output()
        n = rows.size
        return self._remargin(rows, ["QUOTE"] * n, None, [t] * n, snap=self._tick_snapshots)

    def stress(self, worker: str, per_account: dict | None = None) -> list[list]:
        """Exchange-wide stress of this worker's accounts: for each underlying and scenario, how
        many accounts end with negative equity and the uncovered loss (unweighted P&L).

        With ``per_account`` (a dict), it is filled with the per-account scenario P&L as
        columns (account, underlying, scenario, ts, pnl) for the optional ``scenario_pnl``
        table (100k accounts x 35 scenarios is 3.5M rows per call: off by default)."""
        run = self.stress_run(per_account)
        while run.step():
            pass
        return run.rows(worker)

    def stress_run(self, per_account: dict | None = None) -> "StressRun":
        """:meth:`stress` in steps of a few thousand accounts, so a worker can apply input
        between them (one call over 20,000 accounts held the event loop for 15 to 85 ms)."""
        return StressRun(self, per_account)

    def _ensure_rows(self, row: int) -> int:
        n = len(self.book.ids)
        if self._state_arr.shape[0] < n:
            size = max(n, 2 * self._state_arr.shape[0], 1024)
            for name, dt, fill in (("_state_arr", np.int8, 0), ("_seq_arr", np.int64, 0),
                                   ("_last_snap", np.float64, -1e18)):
                old = getattr(self, name)
                grown = np.full(size, fill, dtype=dt)
                grown[:old.shape[0]] = old
                setattr(self, name, grown)
        return row

    def _remargin(self, rows, triggers, sources, ts_ms, res=None, snap=None) -> Output:
        """Margin ``rows`` (or take ``res``, their margin at the current risk set) and derive
        states, margin events and snapshots (of the rows due one, or as ``snap`` says: a mask,
        or a function of (rows, new states, previous states) giving one, as a market tick
        chooses them: :meth:`_tick_snapshots`). ``sources``: the (topic, partition, offset) of
        each row's input record, or None (a market move)."""
        out = Output()
        rs = self.risk_set()
        if res is None:
            res = self.book.margin(rs, rows)
        accts = _pick(self.book.ids, rows)
        self._ensure_rows(0)
        prev = self._state_arr[rows]
        new = E.classify(prev, res.equity, res.im, res.mm, self.thresholds)
        ratio = res.margin_ratio
        short = res.shortfall
        now = self.clock() * 1000
        changed = np.flatnonzero(new != prev)
        for k in changed:
            a = accts[k]
            seq = self.seq.get(a, 0) + 1
            self.seq[a] = seq
            self.state[a] = int(new[k])
            self._seq_arr[rows[k]] = seq
            self._state_arr[rows[k]] = new[k]
            out.touched.add(a)
            out.events.append(self._event(a, seq, int(prev[k]), int(new[k]), res, k, ratio,
                                          short, triggers[k], _source(sources, k), ts_ms[k],
                                          rs))
        if snap is None:
            snap = (new != prev) | _window_passed(rows, self._last_snap[rows], now,
                                                  self.snapshot_interval_ms)
        elif callable(snap):
            snap = snap(rows, new, prev)
        out.snapshots, out.exposures = self._snapshot_columns(rows, accts, res, snap, new,
                                                              ratio, short, triggers, ts_ms,
                                                              rs, now)
        return out

    def _snapshot_columns(self, rows, accts, res, due, new, ratio, short, triggers, ts_ms, rs,
                          now):
        """Risk snapshots of the accounts in the mask ``due`` (state changed, or none yet in the
        account's current snapshot window, see :func:`_window_passed`), built column-wise so
        a market move over 100k accounts stays vectorised. The caller has sized the per-row
        arrays (:meth:`_ensure_rows`)."""
        idx = np.flatnonzero(due)
        if idx.size == 0:
            return {}, {}
        self._last_snap[rows[idx]] = now
        unds = self.universe.underlyings
        names = np.array(unds + [""], dtype=object)
        wu = res.worst_underlying[idx]
        everyone = idx.size == len(accts)
        acc = accts if everyone else _pick(accts, idx)
        ts = np.asarray(ts_ms, dtype=np.int64)[idx]
        trig = triggers if everyone else _pick(triggers, idx)
        # numbers stay numpy arrays: their bytes go into the Native blocks as they are (a
        # Python float per value for 100,000 accounts cost ~20 ms of a market tick); text
        # columns are lists
        snaps = {
            "account": acc, "ts": ts,
            "state": np.array(STATE_NAMES, dtype=object)[new[idx]].tolist(),
            "equity": res.equity[idx], "im": res.im[idx], "mm": res.mm[idx],
            "margin_ratio": ratio[idx], "shortfall": short[idx],
            "worst_underlying": names[np.where(wu >= 0, wu, len(unds))].tolist(),
            "worst_scenario": res.worst_scenario[idx], "worst_pnl": res.worst_pnl[idx],
            "trigger": trig,
            "params_version": np.full(idx.size, int(rs.params_version), dtype=np.int64),
            "seq": self._seq_arr[rows[idx]],
        }
        parts: dict[str, list] = {c: [] for c in EXPOSURE_COLUMNS}
        g = res.greeks[idx]
        for u, name in enumerate(unds):
            if u >= g.shape[1]:
                break
            has = np.flatnonzero(np.any(g[:, u, :] != 0, axis=1))
            if has.size == 0:
                continue
            parts["account"].append(acc if has.size == len(acc) else _pick(acc, has))
            parts["underlying"].append([name] * has.size)
            parts["ts"].append(ts[has])
            for j, col in enumerate(("delta", "gamma", "vega", "theta")):
                parts[col].append(g[has, u, j])
        expo = {c: _concat(v) if v else [] for c, v in parts.items()}
        return snaps, expo

    def _event(self, a, seq, prev, new, res, k, ratio, short, trigger, sources, ts_ms, rs):
        unds = self.universe.underlyings
        wu = int(res.worst_underlying[k])
        plan, restores = [], True
        if new == MarginState.LIQUIDATION:
            lp = E.liquidation_plan(self.book, a, rs, self.thresholds)
            plan = [{"instrument": i, "quantity": float(q)} for i, q in lp.steps]
            restores = bool(lp.restores_mm)
        g = res.greeks[k]
        return {
            "event_id": f"{a}:{seq}", "account": a, "seq": seq,
            "prev_state": STATE_NAMES[prev], "state": STATE_NAMES[new],
            "equity": _f(res.equity[k]), "im": _f(res.im[k]), "mm": _f(res.mm[k]),
            "margin_ratio": _f(ratio[k]), "shortfall": _f(short[k]),
            "worst_underlying": unds[wu] if wu >= 0 else None,
            "worst_scenario": int(res.worst_scenario[k]), "worst_pnl": _f(res.worst_pnl[k]),
            "greeks": [{"underlying": name, "delta": _f(g[u, 0]), "gamma": _f(g[u, 1]),
                        "vega": _f(g[u, 2]), "theta": _f(g[u, 3])}
                       for u, name in enumerate(unds) if u < g.shape[0] and np.any(g[u] != 0)],
            "trigger": trigger, "sources": sources, "liquidation_plan": plan,
            "plan_restores_mm": restores, "params_version": int(rs.params_version),
            "ts": _dt(ts_ms),
        }


class StressRun:
    """One stress evaluation over the accounts present at its start, at the market (risk set)
    of its start; each account is evaluated whole, at the moment its step runs."""

    def __init__(self, proc: RiskProcessor, per_account: dict | None):
        self.proc = proc
        self.per_account = per_account
        n = len(proc.book)
        self.accounts = np.flatnonzero(proc.book.count[:n] > 0).astype(np.int64) if n else \
            np.zeros(0, np.int64)
        self.rs = proc.risk_set() if self.accounts.size else None
        self.ts_ms = proc.market_time_ms()
        self.done = 0
        if self.rs is not None:
            shape = self.rs.weight.shape  # (underlyings, scenarios)
            self.count = np.zeros(shape, dtype=np.int64)
            self.loss = np.zeros(shape)

    def step(self, accounts: int = 2000) -> bool:
        """Evaluate the next ``accounts`` accounts; False once every account is done."""
        if self.rs is None or self.done >= self.accounts.size:
            return False
        proc = self.proc
        if self.rs.value.shape[0] < len(proc.universe):
            # an instrument was listed between steps: positions may reference rows the risk
            # set lacks. This round is dropped (rows() returns none); the next one is whole.
            self.rs = None
            return False
        rows = self.accounts[self.done:self.done + accounts]
        self.done += rows.size
        res = proc.book.margin(self.rs, rows, scenario_pnl=True)
        after = res.equity[:, None, None] + res.scenario_pnl
        neg = after < 0
        self.count += neg.sum(axis=0)
        self.loss += np.where(neg, -after, 0.0).sum(axis=0)
        per = self.per_account
        if per is not None:
            accts = _pick(proc.book.ids, rows)
            n_scen = self.rs.weight.shape[1]
            for u, name in enumerate(proc.universe.underlyings[:res.scenario_pnl.shape[1]]):
                pnl = res.scenario_pnl[:, u, :]
                has = np.flatnonzero(np.any(pnl != 0, axis=1))
                if has.size == 0:
                    continue
                per.setdefault("account", []).extend(
                    a for k in has for a in [accts[k]] * n_scen)
                per.setdefault("underlying", []).extend([name] * (has.size * n_scen))
                per.setdefault("scenario", []).extend(
                    np.tile(np.arange(n_scen), has.size).tolist())
                per.setdefault("ts", []).extend([self.ts_ms] * (has.size * n_scen))
                per.setdefault("pnl", []).extend(pnl[has].ravel().tolist())
        return self.done < self.accounts.size

    def rows(self, worker: str) -> list[list]:
        """The stress rows (one per underlying held and scenario)."""
        if self.rs is None:
            return []
        proc, rs = self.proc, self.rs
        ts = _dt(self.ts_ms)
        out = []
        for u, name in enumerate(proc.universe.underlyings[:rs.weight.shape[0]]):
            holders = proc.book.rows_holding(name)
            if holders.size == 0:
                continue
            for s in range(rs.weight.shape[1]):
                out.append([ts, worker, name, s, float(rs.moves[u, s]), int(rs.vol_sign[u, s]),
                            float(rs.weight[u, s]), int(holders.size),
                            int(self.count[u, s]), float(self.loss[u, s])])
        return out


#: Fractional part of the golden ratio: row r's window phase is frac(r x this), which spreads
#: any run of consecutive rows evenly over the window (a low-discrepancy sequence).
_PHASE = 0.6180339887498949


def _window_passed(rows: np.ndarray, last: np.ndarray, now: float, interval: int) -> np.ndarray:
    """Whether each account at book ``rows`` is in a later snapshot window than its last
    snapshot (``last``, ms; -1e18 for none).

    Time is cut into windows of ``interval`` ms, shifted per account by a phase in
    [0, interval). Each account gets at most one periodic snapshot per window, and one at least
    every window while it is re-margined, as with a plain "interval since the last one" rule.
    But where that rule keeps accounts in step (every account of a book margined by the same
    market tick is due again at the same tick, a second later: 20,000 snapshot rows in one
    tick, then none for nine), the phases spread them over the window, so each tick of a
    moving market writes about a tenth of the book and no tick stalls the account path."""
    if interval <= 0:
        return np.ones(rows.shape[0], dtype=np.bool_)
    phase = np.modf(rows * _PHASE)[0] * interval
    return np.floor((now + phase) / interval) != np.floor((last + phase) / interval)


def _source(sources, k) -> list[dict]:
    """A margin event's ``sources``: the input record behind row ``k`` of a re-margin
    (``sources``: (topic, partition, offset) per row, or None for a market move)."""
    if sources is None:
        return []
    topic, partition, offset = sources[k]
    return [{"topic": topic, "partition": partition, "offset": offset}]


def _pick(seq, idx) -> list:
    """``[seq[i] for i in idx]`` for a numpy index array, at C speed (a Python loop over
    numpy integers costs ~100 ns per item: 10 ms per 100,000-account market tick)."""
    idx = idx.tolist()
    if not idx:
        return []
    got = operator.itemgetter(*idx)(seq)
    return list(got) if len(idx) > 1 else [got]


_RECORD_V2 = b"\x02"


def account_from_bytes(value: bytes) -> dict:
    """An account's changelog record as a dict (``pos``: [instrument, quantity, cost] rows),
    from either format: 2 (:meth:`RiskProcessor.account_record_bytes`) or 1 (JSON)."""
    if value[:1] != _RECORD_V2:
        return orjson.loads(value)
    rec, names, qty, cost = account_parts(value)
    rec["pos"] = [[i, q, c] for i, q, c in zip(names, qty.tolist(), cost.tolist())]
    return rec


def account_parts(value: bytes) -> tuple[dict, list, np.ndarray, np.ndarray]:
    """An account's changelog record as its head (the dict of :func:`account_from_bytes`
    without ``pos``), the instruments held, and their quantities and costs as float64 arrays
    (format 2: views of ``value``). For :meth:`RiskProcessor.load_account_parts`."""
    if value[:1] != _RECORD_V2:
        rec = orjson.loads(value)
        pos = rec.pop("pos")
        return (rec, [p[0] for p in pos], np.array([p[1] for p in pos], dtype=np.float64),
                np.array([p[2] for p in pos], dtype=np.float64))
    n = int.from_bytes(value[1:5], "little")
    rec = orjson.loads(value[5:5 + n])
    names = rec.pop("pi")
    k = len(names)
    if len(value) != 5 + n + 16 * k:
        raise ValueError(f"account record of {len(value)} bytes, expected {5 + n + 16 * k}")
    nums = np.frombuffer(value, dtype="<f8", count=2 * k, offset=5 + n)
    return rec, names, nums[:k], nums[k:]


def event_to_json(e: dict) -> dict:
    return {**e, "ts": _ms(e["ts"])}


def event_from_json(e: dict) -> dict:
    return {**e, "ts": _dt(e["ts"])}


def _f(x) -> float:
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"non-finite margin figure {v}")
    return v
