"""Linear and inverse (coin-settled) instruments agree where the closed forms say they must."""
import numpy as np
import pytest

import engine as E
from .conftest import NOW


def test_inverse_future_pnl_closed_form(uni, mkt):
    rs = mkt.risk_set(NOW)
    book = E.AccountBook(uni)
    f0 = mkt.mark["BTC-INV-PERP"]
    book.apply_trade("inv", "BTC-INV-PERP", 100, f0)  # 100 x $10 contracts at mark
    res = book.margin_account("inv", rs)
    # in scenario s (move m) coin P&L = q*mult*(1/F0 - 1/F1), valued at S1: = q*mult*S*m/F0
    s0 = mkt.index["BTC"]
    u = uni.underlying_index("BTC")
    expected = 100 * 10 * s0 * rs.moves[u] / f0
    worst = np.min(expected * rs.weight[u])
    assert res.worst_pnl[0] == pytest.approx(worst, rel=1e-12)
    assert res.greeks[0, u, 0] == pytest.approx(100 * 10 / f0, rel=1e-12)  # coin delta
    assert res.equity[0] == pytest.approx(0.0, abs=1e-9)


def test_inverse_and_linear_options_share_usd_risk(uni, mkt):
    rs = mkt.risk_set(NOW)
    for k in ("50000-P", "60000-C", "70000-C"):
        lin, inv = uni.row(f"BTC-{k}"), uni.row(f"BTC-{k}-INV")
        np.testing.assert_allclose(rs.risk[lin], rs.risk[inv], rtol=1e-12)
        np.testing.assert_allclose(rs.greeks[lin], rs.greeks[inv], rtol=1e-12)
        assert rs.value[inv] == pytest.approx(rs.value[lin], rel=1e-9)


def test_inverse_option_premium_paid_in_coin_is_shocked(uni, mkt):
    """Buying an inverse option with a coin balance: total USD P&L = V1 - V0*S1/S0 per unit."""
    rs = mkt.risk_set(NOW)
    book = E.AccountBook(uni)
    coin_premium = mkt.mark["BTC-60000-C-INV"]
    book.apply_trade("i", "BTC-60000-C-INV", 1.0, coin_premium)  # pays premium in BTC (debt)
    u = uni.underlying_index("BTC")
    v0 = rs.value[uni.row("BTC-60000-C-INV")]
    pnl = rs.risk[uni.row("BTC-60000-C-INV")] - v0 * rs.moves[u]
    res = book.margin_account("i", rs)
    assert res.worst_pnl[0] == pytest.approx(np.min(pnl * rs.weight[u]), rel=1e-9)


def test_btc_collateral_is_shocked_with_haircut(uni, mkt):
    rs = mkt.risk_set(NOW)
    book = E.AccountBook(uni)
    book.apply_collateral("c", "BTC", 2.0)
    book.apply_trade("c", "BTC-50000-P", -1, 500.0)
    res = book.margin_account("c", rs)
    h = mkt.params.haircut("BTC")
    assert res.equity[0] == pytest.approx(2 * (1 - h) * 60_000 + 500 - rs.value[uni.row(
        "BTC-50000-P")], rel=1e-12)
    # the same short put margined with USD collateral of equal value needs less: BTC collateral
    # falls together with the put
    b2 = E.AccountBook(uni)
    b2.apply_collateral("c", "USD", 2 * (1 - h) * 60_000)
    b2.apply_trade("c", "BTC-50000-P", -1, 500.0)
    assert b2.margin_account("c", rs).im[0] < res.im[0]


def test_realised_pnl_on_reduction(uni):
    book = E.AccountBook(uni)
    book.apply_trade("r", "BTC-PERP", 2, 60_000)
    assert book.apply_trade("r", "BTC-PERP", -1, 61_000) == pytest.approx(1_000)
    assert book.get("r", "BTC-PERP") == (1.0, 60_000.0)
    assert book.get("r", "USD")[0] == pytest.approx(1_000)
    # inverse: 10 contracts of $10, long from 50k, close at 100k: 100*(1/50k - 1/100k) BTC
    book.apply_trade("r", "BTC-INV-PERP", 10, 50_000)
    assert book.apply_trade("r", "BTC-INV-PERP", -10, 100_000) == pytest.approx(0.001)
    assert book.get("r", "BTC-INV-PERP") == (0.0, 0.0)
