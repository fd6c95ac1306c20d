"""Account books: positions and balances of many accounts, ready for the margin kernel.

Storage is CSR with slack: account row ``r`` owns slots ``start[r] .. start[r]+capa[r]`` of flat
arrays, of which the first ``count[r]`` hold its positions, so a trade updates one slot in place
(no rebuild) and a market move margins every account with one kernel call over
``start``/``end``. An account that needs more slots than it has moves alone to a region twice
its size at the end of the arrays: re-laying the whole book instead (every account at twice the
capacity) paused a worker for ~90 ms at 20,000 accounts and doubled the memory of every account
for the sake of one. The arrays themselves grow geometrically (amortised O(1)).
"""
from __future__ import annotations

import math
import operator
import sys
from dataclasses import dataclass

import numba as nb
import numpy as np

from .errors import EngineError, InvalidParameter, InvalidPrice, InvalidQuantity
from .instruments import MAX_ABS_QUANTITY, Kind, Settlement, Universe, check_quantity
from .margin import MarginResult, run_margin
from .market import RiskSet

_LITTLE = sys.byteorder == "little"  # the book's float64 bytes are the record's as they are


@dataclass(frozen=True)
class Position:
    instrument: str
    quantity: float
    cost: float  # settlement currency; 0 for spot balances and options (premium paid up front)


class AccountBook:
    def __init__(self, universe: Universe, capacity: int = 8):
        self.universe = universe
        self.cap = max(1, int(capacity))  # slots given to a new account
        self._row: dict[str, int] = {}
        self.ids: list[str] = []
        self.count = np.zeros(0, dtype=np.int64)
        # per row: bumped by every write to the row, so a reader that ran alongside the writes
        # (a market tick's kernel on another thread) can tell which of its results are stale
        self.version = np.zeros(0, dtype=np.int64)
        self._start = np.zeros(0, dtype=np.int64)  # per row: first slot of its region
        self._capa = np.zeros(0, dtype=np.int64)   # per row: slots in its region
        self._tail = 0                              # first slot no region uses
        self.inst = np.zeros(0, dtype=np.int64)
        self.qty = np.zeros(0, dtype=np.float64)
        self.cost = np.zeros(0, dtype=np.float64)
        self._refresh_views()

    def _refresh_views(self) -> None:
        """Memoryviews of the arrays, for the per-trade reads and writes of single slots:
        ~25 ns each instead of 40-120 ns through numpy's scalar indexing (a trade touches a
        dozen slots). Called whenever an array is replaced (they grow by reallocation)."""
        self._v_inst = memoryview(self.inst)
        self._v_qty = memoryview(self.qty)
        self._v_cost = memoryview(self.cost)
        self._v_start = memoryview(self._start)
        self._v_count = memoryview(self.count)
        self._v_version = memoryview(self.version)

    @classmethod
    def from_dense(cls, universe: Universe, ids, inst, qty, cost) -> "AccountBook":
        """A book of ``len(ids)`` accounts holding ``inst.shape[1]`` positions each, from 2-D
        arrays (row ``r``: the account ``ids[r]``); for benchmarks and bulk loads."""
        n, k = inst.shape
        book = cls(universe, capacity=k)
        book.ids = list(ids)
        book._row = {a: r for r, a in enumerate(book.ids)}
        book.count = np.full(n, k, dtype=np.int64)
        book.version = np.zeros(n, dtype=np.int64)
        book._start = np.arange(n, dtype=np.int64) * k
        book._capa = np.full(n, k, dtype=np.int64)
        book._tail = n * k
        book.inst = np.ascontiguousarray(inst, dtype=np.int64).ravel()
        book.qty = np.ascontiguousarray(qty, dtype=np.float64).ravel()
        book.cost = np.ascontiguousarray(cost, dtype=np.float64).ravel()
        book._refresh_views()
        return book

    # -- layout ---------------------------------------------------------------------------
    def __len__(self):
        return len(self.ids)

    def __contains__(self, account: str) -> bool:
        return account in self._row

    def row(self, account: str, create: bool = True) -> int:
        r = self._row.get(account)
        if r is None:
            if not create:
                raise KeyError(account)
            r = len(self.ids)
            self.ids.append(account)
            self._row[account] = r
            if r >= self.count.shape[0]:
                self._grow_rows(max(16, 2 * self.count.shape[0]))
            self._alloc(r, self.cap)
        return r

    def rows_of(self, accounts: list[str]) -> np.ndarray:
        """Rows of accounts already in the book (a KeyError for one that is not), as int64:
        one lookup in C for the lot, where :meth:`row` per account cost ~0.3 us each on the
        account path."""
        got = operator.itemgetter(*accounts)(self._row) if accounts else ()
        if len(accounts) == 1:
            got = (got,)
        return np.fromiter(got, dtype=np.int64, count=len(accounts))

    def _grow_rows(self, n_rows):
        old = self.count.shape[0]
        pad = np.zeros(n_rows - old, dtype=np.int64)
        self.count = np.concatenate([self.count, pad])
        self.version = np.concatenate([self.version, pad])
        self._start = np.concatenate([self._start, pad])
        self._capa = np.concatenate([self._capa, pad])
        self._refresh_views()

    def _alloc(self, r: int, size: int) -> None:
        """Give row ``r`` a fresh region of ``size`` slots at the tail (its old one is left
        unused)."""
        need = self._tail + size
        if need > self.inst.shape[0]:
            n = max(need, 2 * self.inst.shape[0], 1024)
            for name in ("inst", "qty", "cost"):
                old = getattr(self, name)
                grown = np.zeros(n, dtype=old.dtype)
                grown[:old.shape[0]] = old
                setattr(self, name, grown)
            self._refresh_views()
        self._start[r] = self._tail
        self._capa[r] = size
        self._tail = need

    def reserve(self, r: int, slots: int) -> None:
        """Make room for ``slots`` positions in row ``r``: if its region is smaller, it moves
        (alone) to a new region of at least twice the size, keeping its positions."""
        if slots <= self._capa[r]:
            return
        old, c = int(self._start[r]), int(self.count[r])
        self._alloc(r, max(slots, 2 * int(self._capa[r])))
        new = int(self._start[r])
        for arr in (self.inst, self.qty, self.cost):
            arr[new:new + c] = arr[old:old + c]

    @property
    def start(self) -> np.ndarray:
        return self._start

    @property
    def end(self) -> np.ndarray:
        return self.start + self.count

    # -- positions ------------------------------------------------------------------------
    def get(self, account: str, instrument: str) -> tuple[float, float]:
        r = self._row.get(account)
        return (0.0, 0.0) if r is None else self._get_row(r, self.universe.row(instrument))

    def set(self, account: str, instrument: str, qty: float, cost: float) -> None:
        """Set one position (or balance) of an account; a zero position frees its slot."""
        i = self.universe.row(instrument)
        self._check(qty, cost, instrument)
        self._put(self.row(account), i, qty, cost)

    @staticmethod
    def _check(qty, cost, instrument) -> None:
        check_quantity(qty, instrument)
        if not math.isfinite(cost):
            raise InvalidQuantity(f"cost {cost!r} of {instrument} is not finite", field="cost",
                                  value=cost, instrument=instrument)

    def _slot(self, r: int, i: int) -> int:
        """Slot of instrument ``i`` in row ``r``, or -1: a scan of the row's few slots, as the
        batch kernel does (an index kept per row, a dict each, cost ~200 bytes an account and
        would have to follow every write the kernel makes)."""
        base = self._v_start[r]
        try:
            return base + self._v_inst[base:base + self._v_count[r]].tolist().index(i)
        except ValueError:
            return -1

    def _get_row(self, r: int, i: int) -> tuple[float, float]:
        j = self._slot(r, i)
        if j < 0:
            return 0.0, 0.0
        return self._v_qty[j], self._v_cost[j]

    def _put(self, r: int, i: int, qty: float, cost: float) -> None:
        """Write one checked position of row ``r``; a zero position frees its slot."""
        j = self._slot(r, i)
        self._v_version[r] += 1
        if qty == 0.0 and cost == 0.0:
            if j >= 0:
                vi, vq, vc = self._v_inst, self._v_qty, self._v_cost
                last = self._v_start[r] + self._v_count[r] - 1
                vi[j], vq[j], vc[j] = vi[last], vq[last], vc[last]
                self._v_count[r] -= 1
            return
        if j < 0:
            k = self._v_count[r]
            if k == self._capa[r]:
                self.reserve(r, k + 1)
            j = self._v_start[r] + k
            self._v_count[r] = k + 1
            self._v_inst[j] = i
        self._v_qty[j] = float(qty)
        self._v_cost[j] = float(cost)

    def positions(self, account: str) -> list[Position]:
        if account not in self._row:
            return []
        return [Position(*t) for t in self.position_tuples(account)]

    def position_tuples(self, account: str) -> list[tuple[str, float, float]]:
        """(instrument, quantity, cost) of an account, as plain Python values (fast path for
        persisting account records)."""
        r = self._row.get(account)
        if r is None:
            return []
        base = self._v_start[r]
        end = base + self._v_count[r]
        return list(zip(map(self.universe.ids.__getitem__, self._v_inst[base:end].tolist()),
                        self._v_qty[base:end].tolist(), self._v_cost[base:end].tolist()))

    def position_bytes(self, account: str) -> tuple[list[str], bytes, bytes]:
        """An account's instruments, and its quantities and costs as the float64 bytes of the
        book (little-endian), for its compact changelog record: no float is formatted as
        text, and the record reads back bit for bit."""
        r = self._row.get(account)
        if r is None:
            return [], b"", b""
        base = self._v_start[r]
        end = base + self._v_count[r]
        names = list(map(self.universe.ids.__getitem__, self._v_inst[base:end].tolist()))
        if _LITTLE:
            return names, self._v_qty[base:end].tobytes(), self._v_cost[base:end].tobytes()
        return (names, self.qty[base:end].astype("<f8").tobytes(),
                self.cost[base:end].astype("<f8").tobytes())

    def load(self, account: str, positions) -> None:
        """Replace an account's positions (used when restoring from a table)."""
        r = self.row(account)
        self.count[r] = 0
        self.version[r] += 1
        for p in positions:
            self.set(account, p.instrument, p.quantity, p.cost)

    def load_arrays(self, account: str, inst: list[int], qty: np.ndarray,
                    cost: np.ndarray) -> None:
        """:meth:`load` from arrays (instrument rows, quantities, costs), as a recovered
        account record holds them: the same checks, slots and order, written as one slice.

        Why: a restarted worker loads every recovered account before it margins again; one
        :meth:`set` per position made that ~30 us an account of 15 positions (1.8 s for a
        100,000-account book). Anything :meth:`load` would treat position by position (an
        instrument twice, a value it refuses) goes through :meth:`load`, so its outcome and
        errors are the same."""
        k = len(inst)
        qty = np.asarray(qty, dtype=np.float64)
        cost = np.asarray(cost, dtype=np.float64)
        # |q| <= the bound is False for a NaN and an infinity too
        if len(set(inst)) != k or qty.shape != (k,) or cost.shape != (k,) or not (
                (np.abs(qty) <= MAX_ABS_QUANTITY).all() and np.isfinite(cost).all()):
            ids = self.universe.ids
            self.load(account, [Position(ids[i], q, c) for i, q, c in
                                zip(inst, np.ravel(qty).tolist(), np.ravel(cost).tolist())])
            return
        keep = (qty != 0.0) | (cost != 0.0)
        m = int(keep.sum())
        r = self.row(account)
        self.count[r] = 0
        self.version[r] += 1
        self.reserve(r, m)
        lo = int(self._start[r])
        self.inst[lo:lo + m] = np.asarray(inst, dtype=np.int64)[keep]
        self.qty[lo:lo + m] = qty[keep]
        self.cost[lo:lo + m] = cost[keep]
        self.count[r] = m

    # -- events ---------------------------------------------------------------------------
    def apply_trade(self, account: str, instrument: str, qty: float, price: float,
                    fee: float = 0.0) -> float:
        """Apply a fill; returns the realised P&L in the settlement currency.

        Premium-paid instruments (spot, options) move the settlement balance by qty x price x
        multiplier; futures and perpetuals keep an average cost and realise P&L when reduced.
        """
        # checks on Python floats (math.*, comparisons): numpy's ufuncs on scalars cost a
        # microsecond each; the fill's arithmetic is :func:`_fill`, shared with apply_trades
        uni = self.universe
        i = uni.row(instrument)
        inst = uni.instruments[i]
        q = check_quantity(qty, instrument)
        if q == 0.0:
            raise InvalidQuantity(f"trade quantity for {instrument} is zero", field="quantity",
                                  value=qty, instrument=instrument)
        price, fee = float(price), float(fee)
        if not (math.isfinite(price) and price > 0):
            raise InvalidPrice(f"trade price for {instrument} must be > 0, got {price!r}",
                               field="price", value=price, instrument=instrument)
        if not math.isfinite(fee):
            raise InvalidParameter(f"fee {fee!r} is not finite", field="fee", value=fee)
        settle = inst.settle_asset if inst.kind != Kind.SPOT else "USD"
        # one row lookup for the position and the settlement balance; the arithmetic (and its
        # order) is that of get / set / _add_balance, so results are bit-identical
        r = self._row.get(account)
        Q, C = (0.0, 0.0) if r is None else self._get_row(r, i)
        premium = inst.kind in (Kind.SPOT, Kind.CALL, Kind.PUT)
        Q, C, balance_move = _fill(premium, inst.settlement == Settlement.INVERSE,
                                   inst.multiplier, Q, C, q, price)
        realised = 0.0 if premium else balance_move
        self._check(Q, C, instrument)
        if r is None:
            r = self.row(account)
        self._put(r, i, Q, C)
        self._add_balance_row(r, settle, balance_move)
        if fee:
            self._add_balance_row(r, settle, -fee)
        return realised

    def apply_trades(self, fills) -> list[tuple[int, "EngineError"]]:
        """Apply many fills, ``(account, instrument, qty, price, fee)`` each, in order: the
        same book, bit for bit, as :meth:`apply_trade` on each in turn. Returns ``(index,
        error)`` of the fills rejected (the others are applied).

        Why: a fill through :meth:`apply_trade` spends ~5 us in the interpreter (row lookups,
        checks, three slot writes), a quarter of the worker's time per event. The kernel does
        the arithmetic and the slot writes of a batch in one call, with the same operations in
        the same order. It leaves to :meth:`apply_trade` every fill it is not sure of (a new
        account, an unknown instrument, a region without room for a new slot, any value
        out of its domain, a settlement asset that is the instrument itself), so errors and
        their messages are that method's, and with it every later fill of the same account:
        those then run after the kernel in their order, which is the input's order for each
        account (fills of different accounts touch different rows)."""
        ua = self.universe.arrays
        return self._batch(fills, 3, _apply_fills, (ua.kind, ua.inverse, ua.mult, ua.und,
                                                    ua.spot_row, self.universe.find("USD")),
                           self.apply_trade)

    def apply_collaterals(self, changes) -> list[tuple[int, "EngineError"]]:
        """Apply many balance changes, ``(account, asset, amount)`` each, in order: the same
        book, bit for bit, as :meth:`apply_collateral` on each in turn. Returns ``(index,
        error)`` of the changes rejected (the others are applied).

        Why: one change through :meth:`apply_collateral` costs ~3.4 us in the interpreter
        (two row lookups, a slot scan and a checked write each for the read and the write),
        for one addition. As in :meth:`apply_trades`, the kernel does the batch's arithmetic
        and slot writes in one call and leaves to :meth:`apply_collateral`, in order, every
        change it is not sure of (a new account, an asset not yet in the universe, an amount or
        a balance out of its domain, a region without room) with every later change of the
        same account, so errors and their messages are that method's."""
        return self._batch(changes, 1, _apply_balances, (), self.apply_collateral)

    def _batch(self, items, n_values, kernel, extra, one) -> list[tuple[int, "EngineError"]]:
        """:meth:`apply_trades` and :meth:`apply_collaterals`: items ``(account, instrument,
        *values)`` through ``kernel(rows, instruments, *values, *extra, <the book's arrays>,
        max_abs, left)``, which applies those it is sure of and returns how many it left (their
        indices in ``left``); those then go through ``one``, in order."""
        n = len(items)
        if n == 0:
            return []
        row_of, inst_of = self._row.get, self.universe.find
        rows = np.fromiter((row_of(x[0], -1) for x in items), dtype=np.int64, count=n)
        insts = np.fromiter((inst_of(x[1], -1) for x in items), dtype=np.int64, count=n)
        values = [np.fromiter((x[k] for x in items), dtype=np.float64, count=n)
                  for k in range(2, 2 + n_values)]
        left = np.empty(n, dtype=np.int64)
        tail = np.array([self._tail], dtype=np.int64)
        m = kernel(rows, insts, *values, *extra, self._start, self.count, self._capa, tail,
                   self.version, self.inst, self.qty, self.cost, MAX_ABS_QUANTITY, left)
        self._tail = int(tail[0])
        errors: list[tuple[int, EngineError]] = []
        for e in left[:m].tolist():
            try:
                one(*items[e])
            except EngineError as err:
                errors.append((e, err))
        return errors

    def apply_collateral(self, account: str, asset: str, amount: float) -> None:
        """Deposit (amount > 0) or withdraw / charge (amount < 0) an asset balance."""
        if asset not in self.universe:
            self.universe.add_underlying(asset)
        check_quantity(amount, asset)
        self._add_balance(account, asset, amount)

    def _add_balance(self, account, asset, amount):
        q, _ = self.get(account, asset)
        self.set(account, asset, q + amount, 0.0)

    def _add_balance_row(self, r: int, asset: str, amount: float) -> None:
        i = self.universe.row(asset)
        q = self._get_row(r, i)[0] + amount
        self._check(q, 0.0, asset)
        self._put(r, i, q, 0.0)

    # -- margin ---------------------------------------------------------------------------
    def rows_holding(self, underlying: str) -> np.ndarray:
        """Rows of accounts with any position or balance in ``underlying``."""
        return self.rows_holding_any([underlying])

    def rows_holding_any(self, underlyings) -> np.ndarray:
        """Rows of accounts with any position or balance in any of ``underlyings`` (sorted,
        each once), in one pass over the book: a market tick where both BTC and ETH moved
        took ~5.5 ms under the work lock for a pass per underlying and ``np.unique`` of their
        rows (20,000 accounts of 15 positions), ten times a second."""
        mask = np.zeros(len(self.universe.underlyings), dtype=np.bool_)
        for u in underlyings:
            mask[self.universe.underlying_index(u)] = True
        n = len(self.ids)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        return _rows_holding(self.universe.arrays.und, mask, self._start, self.count, self.inst,
                             n)

    def margin(self, rs: RiskSet, rows=None, parallel: bool | None = None,
               scenario_pnl: bool = False) -> MarginResult:
        if rows is None:
            rows = np.arange(len(self.ids), dtype=np.int64)
        self._check_risk_set(rs)
        start = self.start
        if rows.shape[0] == 1:
            end = start[rows] + self.count[rows]
            return run_margin(np.zeros(1, dtype=np.int64), start[rows],
                              end, self.inst, self.qty, self.cost, self.universe.arrays, rs,
                              parallel=False, out_rows=rows, scenario_pnl=scenario_pnl)
        return run_margin(rows, start, start + self.count, self.inst, self.qty, self.cost,
                          self.universe.arrays, rs, parallel=parallel, scenario_pnl=scenario_pnl)

    def _check_risk_set(self, rs: RiskSet) -> None:
        if rs.value.shape[0] < len(self.universe):
            raise InvalidParameter("risk set is older than the instrument universe; recompute "
                                   "it after adding instruments")

    def margin_job(self, rs: RiskSet, rows: np.ndarray) -> "MarginJob":
        """Margin of ``rows`` to compute on another thread while this book keeps changing
        (see :class:`MarginJob`). Call on the thread that writes the book."""
        self._check_risk_set(rs)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        return MarginJob(rows, self.version[rows], self._start.copy(),
                         self._start + self.count, self.inst, self.qty, self.cost,
                         self.universe.arrays, rs)

    def unchanged(self, job: "MarginJob", lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Mask of ``job.rows[lo:hi]`` not written since the job was made: their results are
        the rows' margin as they are now."""
        return self.version[job.rows[lo:hi]] == job.versions[lo:hi]

    def margin_account(self, account: str, rs: RiskSet) -> MarginResult:
        return self.margin(rs, np.array([self.row(account)], dtype=np.int64), parallel=False)


#: Rows from which a :class:`MarginJob` runs its kernel on all threads (see MarginJob.run).
JOB_PARALLEL_MIN = 50_000


@dataclass(eq=False)
class MarginJob:
    """A margin call detached from the book: the rows, their versions, and the layout and
    slot arrays as they were when it was made.

    Why it is safe to run while the book changes: a write to a row bumps its version, and
    :meth:`AccountBook.unchanged` drops those rows' results. A row not written keeps its
    slots' contents, wherever they are read: an account outgrowing its region moves to fresh
    slots at the tail (its old slots are never reused), and arrays outgrown are replaced by
    copies while the job keeps the old ones. The start/end arrays are copied (the book
    rewrites them when rows are added)."""

    rows: np.ndarray
    versions: np.ndarray
    start: np.ndarray
    end: np.ndarray
    inst: np.ndarray
    qty: np.ndarray
    cost: np.ndarray
    universe_arrays: object
    rs: RiskSet

    def run(self) -> MarginResult:
        """The kernel (it releases the GIL): run it on a thread of its own.

        Serial below :data:`JOB_PARALLEL_MIN` rows: the job exists to use the CPU the event
        loop is not using, and a parallel kernel takes that one too. With 20,000 accounts at
        10,000 events/s with quotes on two CPUs, p99 was 89 and 222 ms serial against 221 and
        316 ms parallel (alternating runs). A larger book's tick is long enough that finishing
        it sooner matters more (100,000 accounts: ~30 ms on two threads, ~60 ms on one)."""
        return run_margin(self.rows, self.start, self.end, self.inst, self.qty, self.cost,
                          self.universe_arrays, self.rs,
                          parallel=self.rows.shape[0] >= JOB_PARALLEL_MIN)


@nb.njit(cache=True)
def _rows_holding(und, mask, start, count, inst, n):
    """Rows among the first ``n`` with a slot whose instrument belongs to an underlying ``u``
    with ``mask[u]``."""
    out = np.empty(n, dtype=np.int64)
    m = 0
    for r in range(n):
        s = start[r]
        for j in range(s, s + count[r]):
            u = und[inst[j]]
            if u >= 0 and mask[u]:
                out[m] = r
                m += 1
                break
    return out[:m]


@nb.njit(cache=True)
def _fill(premium, inverse, mult, Q, C, q, price):
    """A position ``(Q, C)`` after a fill of ``q`` at ``price``, and the settlement balance
    it moves: ``(Q, C, move)``. One function for :meth:`AccountBook.apply_trade` and the
    batch kernel, so both compute the same numbers.

    Premium-paid instruments (``premium``: spot, options) pay ``q x price x multiplier``;
    futures and perpetuals keep an average cost (per contract value ``v``) and move the
    balance by the P&L they realise when reduced."""
    if premium:
        return Q + q, 0.0, -q * price * mult
    v = -mult / price if inverse else mult * price
    realised = 0.0
    if Q == 0.0 or (q > 0) == (Q > 0):
        Q, C = Q + q, C + q * v
    else:
        closing = math.copysign(min(abs(q), abs(Q)), q)
        avg = C / Q
        realised = -closing * (v - avg)
        Q, C = Q + closing, C + closing * avg
        rest = q - closing
        if rest != 0.0:
            Q, C = Q + rest, C + rest * v
        if Q == 0.0:
            C = 0.0
    return Q, C, realised


@nb.njit(cache=True)
def _slot(inst, s, c, i):
    """Index of instrument ``i`` among slots ``s .. s+c``, or -1."""
    for j in range(s, s + c):
        if inst[j] == i:
            return j
    return -1


@nb.njit(cache=True)
def _put_slot(r, i, q, c, start, count, capa, tail, version, inst, qty, cost):
    """:meth:`AccountBook._put` on the arrays, moving a full row to a region twice its size
    at ``tail[0]`` as :meth:`AccountBook.reserve` does (the caller made sure it fits)."""
    base = start[r]
    j = _slot(inst, base, count[r], i)
    version[r] += 1
    if q == 0.0 and c == 0.0:
        if j >= 0:
            last = base + count[r] - 1
            inst[j], qty[j], cost[j] = inst[last], qty[last], cost[last]
            count[r] -= 1
        return
    if j < 0:
        if count[r] == capa[r]:
            new = tail[0]
            for x in range(count[r]):
                inst[new + x], qty[new + x], cost[new + x] = \
                    inst[base + x], qty[base + x], cost[base + x]
            start[r], base = new, new
            tail[0] = new + 2 * capa[r]
            capa[r] = 2 * capa[r]
        j = base + count[r]
        count[r] += 1
        inst[j] = i
    qty[j] = q
    cost[j] = c


@nb.njit(cache=True)
def _ok(q, max_abs):
    return np.isfinite(q) and abs(q) <= max_abs


@nb.njit(cache=True)
def _open(rows, insts, left, m, e):
    """Whether item ``e`` of a batch may go through a kernel: its account and instrument are
    known and no earlier item of its row was left over (``left[:m]``), which would have to be
    applied first."""
    r = rows[e]
    if r < 0 or insts[e] < 0:
        return False
    for b in range(m):
        if rows[left[b]] == r:
            return False
    return True


@nb.njit(cache=True)
def _apply_fills(rows, insts, qtys, prices, fees, kind, inverse, mult, und, spot_row, usd,
                 start, count, capa, tail, version, inst, qty, cost, max_abs, left):
    """The fills of a batch, as :meth:`AccountBook.apply_trade` computes them (same
    operations, same order: bit-identical), except those it leaves to that method: their
    indices go to ``left`` (in order; returns how many), with every later fill of their rows.
    A fill is left when its account is not in the book yet (row < 0), its instrument is
    unknown, an input or a result is out of its domain, its settlement asset is the
    instrument itself, or the slots it may add fit neither its row nor a region of twice the
    size in the arrays' free tail (beyond that the arrays grow, in Python). Every check
    comes before the first write, so a fill left over is untouched."""
    m = 0
    for e in range(rows.shape[0]):
        r, i = rows[e], insts[e]
        ok = _open(rows, insts, left, m, e)
        if ok:
            q, price, fee = qtys[e], prices[e], fees[e]
            ok = _ok(q, max_abs) and q != 0.0 and np.isfinite(price) and price > 0 and \
                np.isfinite(fee)
        if ok:
            k = kind[i]
            srow = spot_row[und[i]] if (k != 0 and inverse[i]) else usd
            ok = srow >= 0 and srow != i
        if ok:
            base, c = start[r], count[r]
            j = _slot(inst, base, c, i)
            js = _slot(inst, base, c, srow)
            need = c + (j < 0) + (js < 0)
            ok = need <= capa[r] or (need <= 2 * capa[r] and
                                     tail[0] + 2 * capa[r] <= inst.shape[0])
        if ok:
            Q, C, move = _fill(k == 0 or k == 3 or k == 4, inverse[i], mult[i],
                               qty[j] if j >= 0 else 0.0, cost[j] if j >= 0 else 0.0, q,
                               price)
            b1 = (qty[js] if js >= 0 else 0.0) + move
            b2 = b1 + (-fee)
            ok = _ok(Q, max_abs) and np.isfinite(C) and _ok(b1, max_abs) and \
                (fee == 0.0 or _ok(b2, max_abs))
        if not ok:
            left[m] = e
            m += 1
            continue
        _put_slot(r, i, Q, C, start, count, capa, tail, version, inst, qty, cost)
        _put_slot(r, srow, b1, 0.0, start, count, capa, tail, version, inst, qty, cost)
        if fee != 0.0:
            _put_slot(r, srow, b2, 0.0, start, count, capa, tail, version, inst, qty, cost)
    return m


@nb.njit(cache=True)
def _apply_balances(rows, insts, amounts, start, count, capa, tail, version, inst, qty, cost,
                    max_abs, left):
    """The balance changes of a batch, as :meth:`AccountBook.apply_collateral` computes them
    (the balance plus the amount, written as a position of cost 0: bit-identical), except
    those it leaves to that method, with every later change of their rows (as
    :func:`_apply_fills`): a row not in the book yet, an asset not in the universe, an amount
    or a resulting balance out of its domain, or a new slot that fits neither the row's
    region nor a region of twice the size in the free tail. Every check comes before the
    write, so a change left over is untouched."""
    m = 0
    for e in range(rows.shape[0]):
        r, i = rows[e], insts[e]
        ok = _open(rows, insts, left, m, e)
        b1 = 0.0
        if ok:
            ok = _ok(amounts[e], max_abs)
        if ok:
            base, c = start[r], count[r]
            j = _slot(inst, base, c, i)
            b1 = (qty[j] if j >= 0 else 0.0) + amounts[e]
            need = c + (j < 0)
            ok = _ok(b1, max_abs) and (need <= capa[r] or (
                need <= 2 * capa[r] and tail[0] + 2 * capa[r] <= inst.shape[0]))
        if not ok:
            left[m] = e
            m += 1
            continue
        _put_slot(r, i, b1, 0.0, start, count, capa, tail, version, inst, qty, cost)
    return m
