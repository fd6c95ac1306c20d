"""Liquidation plans and pre-trade what-if checks.

Both work on a scratch copy of one account, so they never touch the live book.

A liquidation plan is an ordered list of partial closes that brings the account back to
equity >= MM x (1 + buffer). Like Deribit, it closes futures and perpetuals first (they cut delta
cheaply and are the most liquid), then options, each time picking the position whose close
reduces MM the most, and closing only the fraction needed (bisection, rounded up to the lot size).
Closes happen at mark, so they realise value into the settlement balance rather than creating it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .book import AccountBook
from .instruments import Kind, Settlement
from .market import RiskSet
from .params import StateThresholds

_SCRATCH = "__scratch__"


@dataclass(frozen=True)
class MarginSummary:
    equity: float
    im: float
    mm: float

    @property
    def shortfall(self) -> float:
        return max(self.im - self.equity, 0.0)


@dataclass(frozen=True)
class LiquidationPlan:
    steps: list[tuple[str, float]] = field(default_factory=list)  # (instrument, trade qty)
    restores_mm: bool = True
    before: MarginSummary | None = None
    after: MarginSummary | None = None


def _scratch(book: AccountBook, positions) -> AccountBook:
    s = AccountBook(book.universe, capacity=max(8, len(positions) + 4))
    s.load(_SCRATCH, positions)
    return s


def _summary(book: AccountBook, rs: RiskSet) -> MarginSummary:
    r = book.margin_account(_SCRATCH, rs)
    return MarginSummary(float(r.equity[0]), float(r.im[0]), float(r.mm[0]))


def _close(book: AccountBook, rs: RiskSet, instrument: str, fraction: float) -> float:
    """Close ``fraction`` of a position at mark; returns the traded quantity."""
    uni = book.universe
    i = uni.row(instrument)
    inst = uni.instruments[i]
    q, c = book.get(_SCRATCH, instrument)
    dq = -q * fraction
    if inst.lot_size > 0:
        dq = math.copysign(min(abs(q), math.ceil(abs(dq) / inst.lot_size - 1e-9) * inst.lot_size),
                           dq)
    f = -dq / q
    u = uni.arrays.und[i]
    unit = rs.value[i] / (rs.index[u] if inst.settlement == Settlement.INVERSE else 1.0)
    proceeds = f * (q * unit - c)
    book.set(_SCRATCH, instrument, q + dq, c * (1 - f))
    settle = inst.settle_asset
    bq, _ = book.get(_SCRATCH, settle)
    book.set(_SCRATCH, settle, bq + proceeds, 0.0)
    return dq


def liquidation_plan(book: AccountBook, account: str, rs: RiskSet,
                     thresholds: StateThresholds | None = None) -> LiquidationPlan:
    th = thresholds or StateThresholds()
    target = 1.0 + th.liquidation_buffer
    s = _scratch(book, book.positions(account))
    before = cur = _summary(s, rs)
    steps: list[tuple[str, float]] = []

    def ok(m: MarginSummary) -> bool:
        return m.equity >= m.mm * target

    uni = book.universe
    for _ in range(4 * max(1, len(book.positions(account)))):
        if ok(cur):
            break
        best = None
        for category in ((Kind.PERPETUAL, Kind.FUTURE), (Kind.CALL, Kind.PUT)):
            for p in s.positions(_SCRATCH):
                inst = uni.instruments[uni.row(p.instrument)]
                if inst.kind not in category or p.quantity == 0:
                    continue
                saved = s.positions(_SCRATCH)
                _close(s, rs, p.instrument, 1.0)
                m = _summary(s, rs)
                s.load(_SCRATCH, saved)  # undo the trial close
                gain = cur.mm - m.mm
                if gain > 1e-9 and (best is None or gain > best[1]):
                    best = (p.instrument, gain, m)
            if best is not None:
                break
        if best is None:
            break
        name, _, full = best
        frac = 1.0
        if ok(full):
            # smallest fraction that restores the target; 2^-24 is far below any lot size
            saved = s.positions(_SCRATCH)
            lo, hi = 0.0, 1.0
            for _ in range(24):
                mid = 0.5 * (lo + hi)
                _close(s, rs, name, mid)
                good = ok(_summary(s, rs))
                s.load(_SCRATCH, saved)
                if good:
                    hi = mid
                else:
                    lo = mid
            frac = hi
        dq = _close(s, rs, name, frac)
        steps.append((name, dq))
        cur = _summary(s, rs)
    return LiquidationPlan(steps, ok(cur), before, cur)


def what_if(book: AccountBook, account: str, trades, rs: RiskSet) -> tuple[MarginSummary,
                                                                           MarginSummary]:
    """Margin before and after hypothetical ``trades`` [(instrument, qty, price), ...]."""
    s = _scratch(book, book.positions(account))
    before = _summary(s, rs)
    for instrument, qty, price in trades:
        s.apply_trade(_SCRATCH, instrument, qty, price)
    return before, _summary(s, rs)
