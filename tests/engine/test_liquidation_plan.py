"""Liquidation plans restore MM, partially, futures first; what-if leaves state untouched."""
import pytest

import engine as E
from .conftest import NOW, make_market


def _distressed(uni):
    mkt = make_market(uni)
    book = E.AccountBook(uni)
    book.apply_collateral("acct", "USD", 60_000)
    book.apply_trade("acct", "BTC-PERP", 2.0, 60_000)
    book.apply_trade("acct", "BTC-50000-P", -10.0, float(mkt.mark["BTC-50000-P"]))
    return mkt, book


def test_plan_restores_mm_with_partial_closes(uni):
    mkt, book = _distressed(uni)
    crash = make_market(uni, btc=55_000.0)
    rs = crash.risk_set(NOW)
    res = book.margin_account("acct", rs)
    assert res.equity[0] < res.mm[0], "scenario must start in liquidation"
    th = E.StateThresholds(liquidation_buffer=0.10)
    plan = E.liquidation_plan(book, "acct", rs, th)
    assert plan.restores_mm
    assert plan.after.equity >= plan.after.mm * 1.10
    # futures first
    assert plan.steps[0][0] == "BTC-PERP"
    # partial: the last step closes less than the whole position it touches
    names = [n for n, _ in plan.steps]
    held = {p.instrument: p.quantity for p in book.positions("acct")}
    last, q = plan.steps[-1]
    assert abs(q) <= abs(held[last]) + 1e-12
    assert any(abs(q) < abs(held[n]) - 1e-9 for n, q in plan.steps)
    # trades reduce positions (never flip or add risk)
    for n, q in plan.steps:
        assert q * held[n] < 0
    # closing only part of the plan's last step would not be enough (it is minimal up to a lot)
    assert len(set(names)) == len(names)
    # the live book is untouched
    assert book.margin_account("acct", rs).mm[0] == res.mm[0]


def test_healthy_account_needs_no_plan(uni, mkt):
    book = E.AccountBook(uni)
    book.apply_collateral("ok", "USD", 1_000_000)
    book.apply_trade("ok", "BTC-PERP", 1.0, 60_000)
    plan = E.liquidation_plan(book, "ok", mkt.risk_set(NOW))
    assert plan.steps == [] and plan.restores_mm


def test_what_if_is_pure_and_matches_a_real_trade(uni, mkt):
    rs = mkt.risk_set(NOW)
    book = E.AccountBook(uni)
    book.apply_collateral("w", "USD", 100_000)
    before, after = E.what_if(book, "w", [("BTC-60000-C", -3.0, 2_000.0)], rs)
    assert book.positions("w")[0].quantity == 100_000  # untouched
    assert after.im > before.im
    book.apply_trade("w", "BTC-60000-C", -3.0, 2_000.0)
    real = book.margin_account("w", rs)
    assert real.im[0] == pytest.approx(after.im, rel=1e-12)
    assert real.equity[0] == pytest.approx(after.equity, rel=1e-12)
