"""A synthetic exchange: instruments, accounts with realistic books, and a market path.

Deterministic for a seed: the same seed and scenario publish the same records in the same order
(timestamps are derived from a virtual clock that starts at the run's start time).

Books (linear and inverse): short straddles and strangles (premium sellers), covered calls
(coin collateral + short calls), protective puts, futures/perpetual basis and directional
traders, and leveraged perpetual longs; collateral in USD, USDC, BTC and ETH.

Market: geometric Brownian motion with jumps; scenarios ``calm`` (no crash), ``flash-crash``
(-30% within the crash window with implied vol up 60%, then a partial rebound) and
``vol-spike`` (implied vol x2 with a -8% move).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from engine.pricing import option_greeks

UNDERLYINGS = {"BTC": 60_000.0, "ETH": 3_000.0}
BASE_IV = {"BTC": 0.55, "ETH": 0.70}
SCENARIOS = ("calm", "flash-crash", "vol-spike")


@dataclass(frozen=True)
class SimInstrument:
    id: str
    kind: str
    underlying: str
    settlement: str
    multiplier: float
    strike: float | None
    expiry: datetime | None
    lot_size: float


def build_instruments(start: datetime) -> list[SimInstrument]:
    out = []
    for u, s in UNDERLYINGS.items():
        out.append(SimInstrument(f"{u}-PERP", "PERPETUAL", u, "LINEAR", 1.0, None, None, 0.001))
        out.append(SimInstrument(f"{u}-PERPETUAL", "PERPETUAL", u, "INVERSE",
                                 10.0 if u == "BTC" else 1.0, None, None, 1.0))
        for days in (14, 45):
            exp = (start + timedelta(days=days)).replace(hour=8, minute=0, second=0,
                                                         microsecond=0)
            tag = exp.strftime("%d%b%y").upper()
            out.append(SimInstrument(f"{u}-{tag}", "FUTURE", u, "LINEAR", 1.0, None, exp, 0.001))
            step = s * 0.05
            for k in range(-4, 5):
                strike = round((s + k * step) / (100 if u == "BTC" else 10)) * \
                    (100 if u == "BTC" else 10)
                for kind in ("CALL", "PUT"):
                    c = kind[0]
                    out.append(SimInstrument(f"{u}-{tag}-{int(strike)}-{c}", kind, u, "LINEAR",
                                             1.0, float(strike), exp, 0.01))
                    out.append(SimInstrument(f"{u}-{tag}-{int(strike)}-{c}-INV", kind, u,
                                             "INVERSE", 1.0, float(strike), exp, 0.1))
    return out


class Market:
    """Index paths per underlying and marks for every instrument."""

    def __init__(self, instruments, start: datetime, seed: int):
        self.rng = np.random.default_rng(seed + 1)
        self.inst = instruments
        self.spot = dict(UNDERLYINGS)
        self.iv_mult = 1.0
        self.start = start

    def step(self, dt_years: float, drift_shock: float = 0.0, vol=0.6):
        for u in self.spot:
            z = self.rng.standard_normal()
            jump = self.rng.normal(-0.01, 0.02) if self.rng.random() < 0.002 else 0.0
            ret = -0.5 * vol * vol * dt_years + vol * math.sqrt(dt_years) * z + jump
            self.spot[u] *= math.exp(ret + drift_shock)

    def quotes(self, now: datetime):
        out = []
        for i in self.inst:
            s = self.spot[i.underlying]
            if i.kind == "PERPETUAL":
                out.append((i.id, s * 1.0002, s, None))
            elif i.kind == "FUTURE":
                t = max((i.expiry - now).total_seconds(), 60) / (365 * 86400)
                out.append((i.id, s * math.exp(0.05 * t), s, None))
            else:
                t = max((i.expiry - now).total_seconds(), 60) / (365 * 86400)
                iv = min(BASE_IV[i.underlying] * self.iv_mult *
                         (1 + 0.8 * math.log(i.strike / s) ** 2 + 0.1 *
                          max(0.0, -math.log(i.strike / s))), 5.0)
                p = float(option_greeks(s, i.strike, t, iv, 0.0, i.kind == "CALL")[0])
                mark = max(p / s if i.settlement == "INVERSE" else p, 1e-8)
                out.append((i.id, mark, s, iv))
        return out


def build_accounts(n: int, instruments, market: Market, seed: int, start: datetime):
    """Initial deposits and trades (as publishable tuples) for ``n`` accounts."""
    rng = np.random.default_rng(seed)
    marks = {q[0]: q[1] for q in market.quotes(start)}
    by = {i.id: i for i in instruments}
    opts = [i for i in instruments if i.kind in ("CALL", "PUT")]
    deposits, trades = [], []
    for a in range(n):
        acct = f"acct-{a:06d}"
        u = "BTC" if rng.random() < 0.65 else "ETH"
        s = UNDERLYINGS[u]
        style = rng.choice(["straddle", "strangle", "covered_call", "protective", "basis",
                            "perp_long", "inverse_seller"], p=[.2, .15, .15, .1, .1, .2, .1])
        size = float(np.round(rng.lognormal(0.0, 0.8), 2)) or 0.5
        notional = size * s
        lev = rng.uniform(2.0, 5.0)
        u_opts = [o for o in opts if o.underlying == u and o.settlement == "LINEAR"]
        atm = min(u_opts, key=lambda o: abs(o.strike - s))
        exp = atm.expiry

        def opt(kind, k_mult, inverse=False):
            k = min((o for o in opts if o.underlying == u and o.kind == kind and o.expiry == exp
                     and (o.settlement == "INVERSE") == inverse),
                    key=lambda o: abs(o.strike - s * k_mult))
            return k

        legs = []
        if style == "straddle":
            legs = [(opt("CALL", 1.0), -size), (opt("PUT", 1.0), -size)]
            deposits.append((acct, "USDC", round(notional / lev * 0.6, 2)))
        elif style == "strangle":
            legs = [(opt("CALL", 1.1), -size), (opt("PUT", 0.9), -size)]
            deposits.append((acct, "USD", round(notional / lev * 0.5, 2)))
        elif style == "covered_call":
            legs = [(opt("CALL", 1.1, inverse=True), -size)]
            deposits.append((acct, u, size))
        elif style == "protective":
            legs = [(by[f"{u}-PERP"], size), (opt("PUT", 0.95), size)]
            deposits.append((acct, "USD", round(notional / lev, 2)))
        elif style == "basis":
            fut = [i for i in instruments if i.kind == "FUTURE" and i.underlying == u]
            legs = [(fut[0], size), (fut[1], -size)]
            deposits.append((acct, "USDC", round(notional * 0.05, 2)))
        elif style == "perp_long":
            legs = [(by[f"{u}-PERP"], size)]
            deposits.append((acct, "USD", round(notional / (lev * 1.5), 2)))
        else:  # coin-settled option seller with coin collateral
            legs = [(opt("PUT", 0.95, inverse=True), -size), (by[f"{u}-PERPETUAL"],
                                                               round(notional / 40) * 4)]
            deposits.append((acct, u, round(size * 0.35, 4)))
        for inst, q in legs:
            if q:
                trades.append((acct, inst.id, float(q), marks[inst.id]))
    return _calibrate(deposits, trades, instruments, market, start, rng)


def _calibrate(deposits, trades, instruments, market, start, rng):
    """Top up each account with USD so that its equity is 1.25x..3x its initial margin under
    the default risk parameters: most books start HEALTHY and a crash separates the thinly
    collateralised ones from the rest, as on a real exchange."""
    from .processor import RiskProcessor
    proc = RiskProcessor(clock=lambda: start.timestamp())
    for i in instruments:
        proc.apply_instrument(dict(id=i.id, kind=i.kind, underlying=i.underlying,
                                   settlement=i.settlement, multiplier=i.multiplier,
                                   strike=i.strike, expiry=i.expiry, lot_size=i.lot_size))
    for inst, mark, index, iv in market.quotes(start):
        proc.apply_quote(dict(instrument=inst, mark=mark, index_price=index, mark_iv=iv,
                              ts=start))
    events = [("CollateralChange", dict(account=a, asset=asset, amount=float(amt), ts=start),
               "c", 0, n) for n, (a, asset, amt) in enumerate(deposits)]
    events += [("Trade", dict(account=a, instrument=i, quantity=q, price=px, fee=0.0, ts=start),
                "t", 0, n) for n, (a, i, q, px) in enumerate(trades)]
    proc.apply_account_events(events)
    res = proc.book.margin(proc.risk_set())
    out = list(deposits)
    for r, acct in enumerate(proc.book.ids):
        target = res.im[r] * float(rng.uniform(1.25, 3.0))
        if res.equity[r] < target:
            out.append((acct, "USD", round(float(target - res.equity[r]) + 1.0, 2)))
    return out, trades


class Simulator:
    """Publishes a scenario through a :class:`streams.publish.Publisher`."""

    def __init__(self, publisher, accounts: int = 2000, seed: int = 7,
                 scenario: str = "flash-crash", duration_s: float = 120.0,
                 tick_s: float = 0.5, trade_rate: float = 200.0, realtime: bool = True,
                 start: datetime | None = None):
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; choose from {SCENARIOS}")
        self.pub = publisher
        self.n = accounts
        self.seed = seed
        self.scenario = scenario
        self.duration = duration_s
        self.tick = tick_s
        self.trade_rate = trade_rate
        self.realtime = realtime
        self.start = start or datetime.now(timezone.utc).replace(microsecond=0)
        self.instruments = build_instruments(self.start)
        self.market = Market(self.instruments, self.start, seed)
        self.published = {"instruments": 0, "quotes": 0, "trades": 0, "collateral": 0}
        self.phase = "setup"

    def setup(self):
        for i in self.instruments:
            self.pub.instrument(i.id, i.kind, i.underlying, i.settlement, i.multiplier, i.strike,
                                i.expiry, i.lot_size, ts=self.start)
            self.published["instruments"] += 1
        self.pub.flush()
        self._quote(self.start)
        deposits, trades = build_accounts(self.n, self.instruments, self.market, self.seed,
                                          self.start)
        for n, (acct, asset, amt) in enumerate(deposits):
            self.pub.collateral(f"init-{n}", acct, asset, float(amt), ts=self.start)
            self.published["collateral"] += 1
        for n, (acct, inst, q, px) in enumerate(trades):
            self.pub.trade(f"init-{n}", acct, inst, q, px, ts=self.start)
            self.published["trades"] += 1
        self.pub.flush()

    def _quote(self, now):
        for inst, mark, index, iv in self.market.quotes(now):
            self.pub.quote(inst, mark, index, mark_iv=iv, ts=now)
            self.published["quotes"] += 1

    def run(self, progress=None):
        """Publish the scenario; ``progress(sim)`` is called after every tick."""
        rng = np.random.default_rng(self.seed + 2)
        steps = int(self.duration / self.tick)
        crash_at, crash_len = int(steps * 0.3), max(1, int(steps * 0.25))
        dt_years = 60.0 / (365 * 86400)  # each tick is one simulated minute
        wall0 = time.monotonic()
        ids = [i.id for i in self.instruments if i.kind in ("PERPETUAL", "FUTURE")]
        tid = 0
        for k in range(steps):
            now = self.start + timedelta(minutes=k + 1)
            shock = 0.0
            self.phase = "calm"
            if self.scenario == "flash-crash" and crash_at <= k < crash_at + crash_len:
                shock = math.log(0.70) / crash_len
                self.market.iv_mult = 1.0 + 0.6 * (k - crash_at + 1) / crash_len
                self.phase = "crash"
            elif self.scenario == "flash-crash" and k >= crash_at + crash_len:
                shock = math.log(1.08) / max(1, steps - crash_at - crash_len)
                self.market.iv_mult = max(1.2, self.market.iv_mult - 0.01)
                self.phase = "rebound"
            elif self.scenario == "vol-spike" and crash_at <= k < crash_at + crash_len:
                self.market.iv_mult = 1.0 + (k - crash_at + 1) / crash_len
                shock = math.log(0.92) / crash_len
                self.phase = "vol spike"
            self.market.step(dt_years, shock)
            self._quote(now)
            for _ in range(rng.poisson(self.trade_rate * self.tick)):
                acct = f"acct-{rng.integers(self.n):06d}"
                inst = ids[rng.integers(len(ids))]
                u = inst.split("-")[0]
                px = self.market.spot[u] * (1.0002 if "PERP" in inst else 1.01)
                self.pub.trade(f"sim-{tid}", acct, inst, float(rng.choice([-1, 1]) *
                               rng.integers(1, 5) * (10 if inst.endswith("PERPETUAL") else 0.01)),
                               px, ts=now)
                tid += 1
                self.published["trades"] += 1
            if self.phase in ("rebound",) and rng.random() < 0.3:
                acct = f"acct-{rng.integers(self.n):06d}"
                self.pub.collateral(f"topup-{k}", acct, "USD", 25_000.0, ts=now)
                self.published["collateral"] += 1
            self.pub.producer.poll(0)
            if progress:
                progress(self)
            if self.realtime:
                sleep = wall0 + (k + 1) * self.tick - time.monotonic()
                if sleep > 0:
                    time.sleep(sleep)
        self.pub.flush()
        self.phase = "done"
