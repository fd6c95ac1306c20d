"""Bad input raises a specific engine error naming the offending value; never a silent NaN."""
import math

import pytest

import engine as E
from .conftest import DAY, NOW


@pytest.mark.parametrize("price", [float("nan"), 0.0, -5.0, float("inf")])
def test_bad_quote_prices(mkt, price):
    with pytest.raises(E.InvalidPrice) as ei:
        mkt.set_quote("BTC-PERP", price)
    assert ei.value.instrument == "BTC-PERP"
    with pytest.raises(E.InvalidPrice):
        mkt.set_index("BTC", price)


def test_bad_iv(mkt):
    with pytest.raises(E.InvalidVolatility):
        mkt.set_quote("BTC-60000-C", 100.0, iv=float("nan"))
    with pytest.raises(E.InvalidVolatility):
        mkt.set_quote("BTC-60000-C", 100.0, iv=None)


def test_unknown_instrument(uni, mkt):
    with pytest.raises(E.UnknownInstrument) as ei:
        mkt.set_quote("DOGE-PERP", 1.0)
    assert ei.value.value == "DOGE-PERP"
    with pytest.raises(E.UnknownInstrument):
        E.AccountBook(uni).apply_trade("a", "NOPE", 1, 1)


@pytest.mark.parametrize("qty", [float("nan"), 1e12, -float("inf"), 0.0])
def test_absurd_quantity(uni, qty):
    with pytest.raises(E.InvalidQuantity) as ei:
        E.AccountBook(uni).apply_trade("a", "BTC-PERP", qty, 60_000)
    assert ei.value.field == "quantity"


def test_expired_option(uni, mkt):
    with pytest.raises(E.ExpiredInstrument) as ei:
        mkt.risk_set(NOW + 31 * DAY)
    assert ei.value.instrument is not None
    # non-strict mode leaves expired instruments unpriced instead of failing the whole set
    rs = mkt.risk_set(NOW + 31 * DAY, strict=False)
    assert all(math.isfinite(v) for v in rs.value)


def test_bad_params():
    with pytest.raises(E.InvalidParameter):
        E.UnderlyingParams(scan_range=-0.1)
    with pytest.raises(E.InvalidParameter):
        E.RiskParams(haircuts={"BTC": 1.5})
    with pytest.raises(E.InvalidParameter):
        E.Instrument("X", E.Kind.CALL, "BTC", strike=None, expiry_ms=NOW)


def test_missing_market_data(uni):
    m = E.Market(uni)
    m.set_index("BTC", 60_000)
    with pytest.raises(E.MissingMarketData):
        m.risk_set(NOW)
