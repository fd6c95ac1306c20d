"""A market keeps what its risk sets need from the risk parameters and the universe between
calls; a change of either must show in the next risk set exactly as in a market that never
computed one before."""
import dataclasses

import numpy as np

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
