"""The numba margin kernels against the slow reference, and incremental == batch."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import engine as E
from .conftest import NOW, make_market, make_universe
from .reference import margin_ref, risk_array_ref

UNI = make_universe()
MKT = make_market(UNI)
RS = MKT.risk_set(NOW)
TRADABLE = [i.id for i in UNI.instruments if i.kind != E.Kind.SPOT]


def test_risk_arrays_match_reference():
    for inst in UNI.instruments:
        ref = risk_array_ref(MKT, inst, NOW)
        if ref is None:
            assert not RS.risk[UNI.row(inst.id)].any()
            continue
        got = RS.risk[UNI.row(inst.id), :len(ref)]
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-7, err_msg=inst.id)


trade = st.tuples(st.sampled_from(TRADABLE), st.floats(-20, 20).filter(lambda q: abs(q) > 1e-3),
                  st.floats(0.5, 1.5))
account = st.tuples(st.lists(trade, min_size=1, max_size=8),
                    st.dictionaries(st.sampled_from(["USD", "USDT", "BTC", "ETH"]),
                                    st.floats(-5, 200_000), max_size=3))


def _fill(book, name, trades, deposits):
    for asset, amt in deposits.items():
        book.apply_collateral(name, asset, amt if asset in ("USD", "USDT") else amt / 50_000)
    for inst_id, q, pf in trades:
        mark = MKT.mark[inst_id]
        book.apply_trade(name, inst_id, q, mark * pf)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(accounts=st.lists(account, min_size=1, max_size=12))
def test_kernel_matches_reference_and_incremental_equals_batch(accounts):
    book = E.AccountBook(UNI, capacity=2)  # small capacity also exercises the re-layout
    for n, (trades, deposits) in enumerate(accounts):
        _fill(book, f"a{n}", trades, deposits)
    batch = book.margin(RS, parallel=True)
    serial = book.margin(RS, parallel=False)
    for n in range(len(accounts)):
        one = book.margin_account(f"a{n}", RS)
        for f in ("equity", "im", "mm", "worst_pnl"):
            assert getattr(one, f)[0] == getattr(batch, f)[n] == getattr(serial, f)[n]
        np.testing.assert_array_equal(one.greeks[0], batch.greeks[n])
        e, im, mm = margin_ref(book, f"a{n}", MKT, RS)
        assert batch.equity[n] == pytest.approx(e, rel=1e-9, abs=1e-6)
        assert batch.im[n] == pytest.approx(im, rel=1e-6, abs=1e-6)
        assert batch.mm[n] == pytest.approx(mm, rel=1e-6, abs=1e-6)


def test_market_move_remargins_only_holders():
    book = E.AccountBook(UNI)
    book.apply_trade("btc", "BTC-PERP", 1, 60_000)
    book.apply_trade("eth", "ETH-PERP", 1, 3_000)
    book.apply_collateral("cash", "USD", 5)
    assert book.rows_holding("BTC").tolist() == [0]
    assert book.rows_holding("ETH").tolist() == [1]


def test_scenario_pnl_output_matches_worst_scenario():
    book = E.AccountBook(UNI)
    book.apply_collateral("s", "USD", 10_000)
    book.apply_trade("s", "BTC-60000-C", -2, 1_000.0)
    book.apply_trade("s", "ETH-PERP", 3, 3_000.0)
    r = book.margin(RS, scenario_pnl=True)
    u, s = r.worst_underlying[0], r.worst_scenario[0]
    assert r.scenario_pnl.shape == (1, RS.weight.shape[0], RS.weight.shape[1])
    assert r.scenario_pnl[0, u, s] * RS.weight[u, s] == r.worst_pnl[0]
    plain = book.margin(RS)
    assert plain.scenario_pnl is None and plain.im[0] == r.im[0]
