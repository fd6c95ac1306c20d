"""CME SPAN risk array of a long future (McMillan, ch. 34) and its requirement."""
import numpy as np
import pytest

import engine as E
from .conftest import DAY, NOW

PUBLISHED = [0, 0, 3330, 3330, -3330, -3330, 6670, 6670, -6670, -6670, 10000, 10000,
             -10000, -10000, 7000, -7000]


def test_span16_long_future_risk_array_and_requirement():
    uni = E.Universe()
    uni.add(E.Instrument("ES", E.Kind.FUTURE, "SPX", multiplier=500.0, expiry_ms=NOW + 60 * DAY))
    params = E.RiskParams(default=E.UnderlyingParams(
        scan_range=20 / 1000, grid="span16", concentration_rate=0.0, basis_rate=0.0))
    mkt = E.Market(uni, params)
    mkt.set_index("SPX", 1000.0)
    mkt.set_quote("ES", 1000.0)
    rs = mkt.risk_set(NOW)
    arr = rs.risk[uni.row("ES")] * rs.weight[uni.underlying_index("SPX")]
    # the published figures are rounded to the nearest 10 dollars
    np.testing.assert_allclose(arr, PUBLISHED, atol=3.34)
    assert arr[10] == pytest.approx(10_000.0) and arr[14] == pytest.approx(7_000.0)
    book = E.AccountBook(uni)
    book.apply_collateral("acct", "USD", 50_000)
    book.apply_trade("acct", "ES", 1, 1000.0)
    res = book.margin_account("acct", rs)
    assert res.im[0] == pytest.approx(10_000.0)
    assert res.worst_scenario[0] in (12, 13)


def test_offset_position_has_zero_scan_risk(uni, mkt):
    book = E.AccountBook(uni)
    book.apply_collateral("x", "USD", 1_000)
    for name in ("BTC-60000-C", "BTC-FUT-M", "BTC-50000-P-INV"):
        book.apply_trade("x", name, 3, 100.0 if "FUT" not in name else 60_000)
        book.apply_trade("x", name, -3, 100.0 if "FUT" not in name else 60_000)
    rs = mkt.risk_set(NOW)
    res = book.margin_account("x", rs)
    assert res.im[0] == 0.0 and res.mm[0] == 0.0
    # long and short the same option held at once in two accounts sum to zero scenario P&L
    b2 = E.AccountBook(uni)
    b2.set("y", "BTC-60000-C", 2.0, 0.0)
    b2.set("z", "BTC-60000-C", -2.0, 0.0)
    r = b2.margin(rs)
    assert r.im[0] > 0 and r.im[1] > 0
    i = uni.row("BTC-60000-C")
    np.testing.assert_allclose(2 * rs.risk[i] - 2 * rs.risk[i], 0.0)
