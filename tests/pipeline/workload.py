"""A deterministic account workload whose margin events depend only on each account's own
input sequence (the market is fixed during the run), so any worker layout, batching, crash or
restart must produce exactly the offline replay's events."""
from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

from engine.pricing import option_greeks
from streams.processor import RiskProcessor

T0 = datetime(2026, 11, 22, tzinfo=timezone.utc)
EXP = datetime(2026, 12, 22, 8, tzinfo=timezone.utc)
INSTRUMENTS = [
    dict(id="BTC-PERP", kind="PERPETUAL", underlying="BTC", settlement="LINEAR", multiplier=1.0,
         strike=None, expiry=None, lot_size=0.001, ts=T0),
    dict(id="BTC-55000-P", kind="PUT", underlying="BTC", settlement="LINEAR", multiplier=1.0,
         strike=55_000.0, expiry=EXP, lot_size=0.1, ts=T0),
]


def quotes(spot=60_000.0):
    t = (EXP - T0).total_seconds() / (365 * 86400)
    put = float(option_greeks(spot, 55_000.0, t, 0.6, 0.0, False)[0])
    return [dict(instrument="BTC-PERP", mark=spot, index_price=spot, mark_iv=None, ts=T0),
            dict(instrument="BTC-55000-P", mark=put, index_price=spot, mark_iv=0.6, ts=T0)]


def account_events(n_accounts: int, seed: int = 11):
    """(deposits, trades): [(topic, record name, record)] in publish order, interleaving
    accounts. Deposits are published (and applied) first; the trade stream then drives every
    transition from a single topic, so each account's input order is fixed by Kafka."""
    rng = random.Random(seed)
    put = quotes()[1]["mark"]
    per = []
    for a in range(n_accounts):
        acct = f"acct-{a:04d}"
        evs = [("collateral", "CollateralChange", dict(
            change_id=f"{acct}-d0", account=acct, asset="USD",
            amount=float(rng.choice([20_000, 40_000, 60_000])), kind="DEPOSIT", ts=T0))]
        for k in range(rng.randint(4, 9)):
            sell = rng.random() < 0.7
            evs.append(("trades", "Trade", dict(
                trade_id=f"{acct}-t{k}", account=acct, instrument="BTC-55000-P",
                quantity=-float(rng.randint(1, 3)) if sell else 1.0, price=put, fee=0.0,
                ts=T0 + timedelta(seconds=k))))
        per.append(evs)
    deposits = [evs.pop(0) for evs in per]
    out = []
    while any(per):
        for evs in per:
            if evs:
                out.append(evs.pop(0))
    return deposits, out


def publish_reference(pub):
    for inst in INSTRUMENTS:
        pub.record("instruments", "Instrument", inst["id"], inst)
    for q in quotes():
        pub.record("quotes", "Quote", q["instrument"], q)
    pub.flush()


def market_ready(proc: RiskProcessor) -> RiskProcessor:
    """``proc`` with the workload's instruments and opening quotes applied."""
    for inst in INSTRUMENTS:
        proc.apply_instrument(inst)
    for q in quotes():
        proc.apply_quote(q)
    proc.on_market_tick()
    return proc


def steady_processor() -> RiskProcessor:
    """:func:`market_ready` with a fixed clock and a snapshot on every touch: outputs that
    depend only on the input, for comparing two ways of applying it."""
    return market_ready(RiskProcessor(snapshot_interval_ms=0, clock=lambda: 1_800_000_000.0))


def replay(events):
    """Offline: the events every account must produce, and its final stored record."""
    proc = market_ready(RiskProcessor())
    offsets: dict[str, int] = {}
    margin_events = []
    for topic, name, rec in events:
        key = (topic, rec["account"])
        offsets[key] = offsets.get(key, -1) + 1  # offsets only need to increase per account
        margin_events += proc.apply_account_events(
            [(name, rec, topic, 0, offsets[key])]).events
    return margin_events, proc
