"""A market keeps what its risk sets need from the risk parameters and the universe between
calls; a change of either must show in the next risk set exactly as in a market that never
computed one before."""
import dataclasses

import numpy as np
import pytest

import engine as E
from tests.engine.conftest import DAY, NOW, make_market, make_universe


def _same(a: E.RiskSet, b: E.RiskSet) -> None:
    for f in dataclasses.fields(E.RiskSet):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape, f.name
            assert x.tobytes() == y.tobytes(), f.name  # bit for bit
        else:
            assert x == y, f.name


def _fresh(mkt: E.Market, now: int) -> E.RiskSet:
    """The same market state in a market that has computed nothing yet."""
    other = E.Market(mkt.universe, mkt.params)
    other.index, other.mark, other.iv = dict(mkt.index), dict(mkt.mark), dict(mkt.iv)
    return other.risk_set(now, strict=False)


def test_risk_sets_follow_quotes_params_and_listings():
    uni = make_universe()
    mkt = make_market(uni)
    steps = []
    for k in range(3):  # quotes and time move; the parameters and the universe do not
        mkt.set_index("BTC", 60_000.0 + 700.0 * k)
        mkt.set_quote("BTC-PERP", 60_010.0 + 700.0 * k)
        steps.append(NOW + k * DAY)
    for now in steps:
        before = mkt.risk_set(now, strict=False)
        _same(before, _fresh(mkt, now))
    # new parameters: another scan range, grid and haircut for BTC
    btc = dataclasses.replace(mkt.params.for_underlying("BTC"), scan_range=0.3, grid="span16")
    mkt.set_params(dataclasses.replace(mkt.params.with_underlying("BTC", btc),
                                       haircuts={"BTC": 0.2}))
    got = mkt.risk_set(NOW, strict=False)
    _same(got, _fresh(mkt, NOW))
    assert got.moves.shape != before.moves.shape or not np.array_equal(got.moves, before.moves)
    assert got.haircut[uni.row("BTC")] == 0.2 != before.haircut[uni.row("BTC")]
    # a listing (and a new underlying with it), then a quote for it
    uni.add(E.Instrument("SOL-PERP", E.Kind.PERPETUAL, "SOL", multiplier=1.0, lot_size=0.1))
    mkt.set_index("SOL", 150.0)
    mkt.set_quote("SOL-PERP", 150.1)
    got = mkt.risk_set(NOW, strict=False)
    _same(got, _fresh(mkt, NOW))
    assert got.value[uni.row("SOL-PERP")] == 150.1
    # an update of a listed instrument (its expiry moved) is picked up too
    uni.add(E.Instrument("BTC-FUT-M", E.Kind.FUTURE, "BTC", multiplier=1.0,
                         expiry_ms=NOW + 2 * DAY, lot_size=0.001))
    _same(mkt.risk_set(NOW + DAY, strict=False), _fresh(mkt, NOW + DAY))


def _reference_inputs(mkt: E.Market, now: int, strict: bool):
    """The pricing inputs as a plain loop over the instruments, the vol shock from
    :meth:`UnderlyingParams.vol_shock`: what the compiled pass must reproduce bit for bit.
    Returns the arrays, or the error a strict call raises (type and message)."""
    uni = mkt.universe
    n = len(uni)
    spot = {u: mkt.index.get(u) for u in uni.underlyings}
    missing = [u for u in uni.underlyings if spot[u] is None]
    if strict and missing:
        return E.MissingMarketData, f"no index price for underlying {missing[0]}"
    mark, vol = np.full(n, np.nan), np.full(n, np.nan)
    t_years, shock, priced = np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.bool_)
    for i, inst in enumerate(uni.instruments):
        u = inst.underlying
        if u is not None and spot[u] is None:
            continue
        if inst.kind == E.Kind.SPOT:
            priced[i] = True
            continue
        m = mkt.mark.get(inst.id)
        if m is None:
            if strict:
                return E.MissingMarketData, f"no quote for {inst.id}"
            continue
        if inst.expiry_ms is not None:
            dt = inst.expiry_ms - now
            if dt <= 0:
                if strict:
                    return E.ExpiredInstrument, f"{inst.id} expired at {inst.expiry_ms} (now {now})"
                continue
            t_years[i] = dt / E.instruments.MS_PER_YEAR
            shock[i] = mkt.params.for_underlying(u).vol_shock(dt / E.instruments.MS_PER_DAY)
        mark[i] = m
        if inst.is_option:
            vol[i] = mkt.iv[inst.id]
        priced[i] = True
    return mark, vol, t_years, shock, priced


def _inputs_seen(mkt: E.Market, now: int):
    """The inputs the market's risk set priced with, caught at its pricing kernel."""
    seen = {}
    real = E.market.risk_arrays

    def spy(rows, kind, inverse, mult, strike, t_years, spot, mark, vol, *rest):
        seen.update(mark=mark.copy(), vol=vol.copy(), t_years=t_years.copy(),
                    shock=rest[1].copy(), rows=rows.copy())
        return real(rows, kind, inverse, mult, strike, t_years, spot, mark, vol, *rest)

    E.market.risk_arrays = spy
    try:
        mkt.risk_set(now, strict=False)
    finally:
        E.market.risk_arrays = real
    return seen


def test_pricing_inputs_match_a_plain_loop():
    """Per-underlying vol-shock parameters (floors hit and not), expired and missing quotes,
    an underlying without an index, quotes after the first risk set and a listing after it:
    the compiled pass gives the loop's inputs bit for bit, and strict calls the loop's error."""
    uni = make_universe()
    mkt = make_market(uni)
    eth = dataclasses.replace(mkt.params.for_underlying("ETH"), vol_shock_base=0.7,
                              vol_shock_power=0.37, dte_floor_days=9.5)
    mkt.set_params(mkt.params.with_underlying("ETH", eth))
    rng = np.random.default_rng(7)
    strict_errors = strict_ok = 0
    for k in range(40):
        now = NOW + int(rng.integers(0, 35 * DAY))
        if k == 10:  # a listing, quoted later: unpriced until then
            uni.add(E.Instrument("ETH-2500-P", E.Kind.PUT, "ETH", multiplier=1.0, strike=2500,
                                 expiry_ms=NOW + 20 * DAY, lot_size=0.1))
        if k == 20:
            mkt.set_quote("ETH-2500-P", 12.5, iv=0.8)
        if k == 25:  # a new underlying without an index yet, with a quoted perpetual later
            uni.add(E.Instrument("SOL-PERP", E.Kind.PERPETUAL, "SOL", multiplier=1.0,
                                 lot_size=0.1))
        if k == 30:
            mkt.set_quote("SOL-PERP", 150.0, index=149.9)
        inst = uni.instruments[int(rng.integers(len(uni)))]
        if inst.kind != E.Kind.SPOT and inst.id in mkt.mark:
            mkt.set_quote(inst.id, mkt.mark[inst.id] * (1 + 0.01 * rng.standard_normal()),
                          iv=mkt.iv.get(inst.id) if inst.is_option else None)
        want = _reference_inputs(mkt, now, strict=False)
        got = _inputs_seen(mkt, now)
        for name, w in zip(("mark", "vol", "t_years", "shock"), want[:4]):
            assert got[name].tobytes() == w.tobytes(), (k, name)
        assert got["rows"].tolist() == np.flatnonzero(want[4]).tolist(), k
        strict_want = _reference_inputs(mkt, now, strict=True)
        if isinstance(strict_want[0], type):
            with pytest.raises(strict_want[0]) as ei:
                mkt.risk_set(now)
            assert str(ei.value) == strict_want[1]
            strict_errors += 1
        else:
            mkt.risk_set(now)
            strict_ok += 1
    assert any(t > 0 for t in got["shock"])
    assert strict_errors >= 2 and strict_ok >= 2, (strict_errors, strict_ok)
