import numpy as np
import pytest

import engine as E

DAY = 86_400_000
NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def make_universe():
    uni = E.Universe()
    uni.add(E.Instrument("BTC-PERP", E.Kind.PERPETUAL, "BTC", multiplier=1.0, lot_size=0.001))
    uni.add(E.Instrument("BTC-INV-PERP", E.Kind.PERPETUAL, "BTC", E.Settlement.INVERSE,
                         multiplier=10.0, lot_size=1))
    uni.add(E.Instrument("BTC-FUT-M", E.Kind.FUTURE, "BTC", multiplier=1.0,
                         expiry_ms=NOW + 30 * DAY, lot_size=0.001))
    uni.add(E.Instrument("BTC-FUT-Q", E.Kind.FUTURE, "BTC", multiplier=1.0,
                         expiry_ms=NOW + 90 * DAY, lot_size=0.001))
    for k in (50_000, 60_000, 70_000):
        for kind, tag in ((E.Kind.CALL, "C"), (E.Kind.PUT, "P")):
            uni.add(E.Instrument(f"BTC-{k}-{tag}", kind, "BTC", multiplier=1.0, strike=k,
                                 expiry_ms=NOW + 30 * DAY, lot_size=0.01))
            uni.add(E.Instrument(f"BTC-{k}-{tag}-INV", kind, "BTC", E.Settlement.INVERSE,
                                 multiplier=1.0, strike=k, expiry_ms=NOW + 30 * DAY,
                                 lot_size=0.1))
    uni.add(E.Instrument("ETH-PERP", E.Kind.PERPETUAL, "ETH", multiplier=1.0, lot_size=0.01))
    uni.add(E.Instrument("ETH-3000-C", E.Kind.CALL, "ETH", multiplier=1.0, strike=3000,
                         expiry_ms=NOW + 7 * DAY, lot_size=0.1))
    return uni


def make_market(uni, btc=60_000.0, eth=3_000.0, params=None):
    mkt = E.Market(uni, params)
    mkt.set_index("BTC", btc)
    mkt.set_index("ETH", eth)
    mkt.set_quote("BTC-PERP", btc * 1.0002)
    mkt.set_quote("BTC-INV-PERP", btc * 1.0001)
    mkt.set_quote("BTC-FUT-M", btc * 1.004)
    mkt.set_quote("BTC-FUT-Q", btc * 1.012)
    mkt.set_quote("ETH-PERP", eth * 1.0002)
    for inst in uni.instruments:
        if inst.is_option:
            u = inst.underlying
            s = mkt.index[u]
            t = (inst.expiry_ms - NOW) / E.instruments.MS_PER_YEAR
            iv = 0.55 + 0.1 * abs(np.log(inst.strike / s))
            p = E.option_greeks(s, inst.strike, t, iv, 0.0, inst.kind == E.Kind.CALL)[0]
            mark = float(p) / s if inst.settlement == E.Settlement.INVERSE else float(p)
            mkt.set_quote(inst.id, max(mark, 1e-8), iv=iv)
    return mkt


@pytest.fixture
def uni():
    return make_universe()


@pytest.fixture
def mkt(uni):
    return make_market(uni)
