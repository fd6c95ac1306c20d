"""Exchange-wide stress computed in steps (so the worker can apply input between them) equals
a slow reference that margins each account on its own and tallies by hand."""
import numpy as np

from tests.pipeline.workload import account_events, replay


def test_stress_in_steps_equals_a_per_account_reference():
    deposits, events = account_events(120)
    _, proc = replay(deposits + events)
    rs = proc.risk_set()
    per_step = {}
    run = proc.stress_run(per_step)
    steps = 1
    while run.step(7):
        steps += 1
    got = run.rows("w")
    assert steps == -(-run.accounts.size // 7) and run.accounts.size > 100

    n_und, n_scen = rs.weight.shape
    count = np.zeros((n_und, n_scen), dtype=int)
    loss = np.zeros((n_und, n_scen))
    for row in run.accounts:
        res = proc.book.margin(rs, np.array([row]), scenario_pnl=True)
        for u in range(n_und):
            for s in range(n_scen):
                after = float(res.equity[0]) + float(res.scenario_pnl[0, u, s])
                if after < 0:
                    count[u, s] += 1
                    loss[u, s] -= after
    assert len(got) == n_scen * sum(proc.book.rows_holding(u).size > 0
                                    for u in proc.universe.underlyings)
    for ts, worker, und, s, move, vol, weight, holders, n_neg, uncovered in got:
        u = proc.universe.underlyings.index(und)
        assert (worker, holders) == ("w", proc.book.rows_holding(und).size)
        assert n_neg == count[u, s]
        assert abs(uncovered - loss[u, s]) <= 1e-9 * max(1.0, loss[u, s])
    assert count.sum() > 0  # the workload has accounts a stress scenario wipes out

    whole = {}
    one_call = proc.stress("w", whole)  # the same rows (the loss summed in another order)
    assert [r[:9] for r in one_call] == [r[:9] for r in got]
    assert np.allclose([r[9] for r in one_call], [r[9] for r in got], rtol=1e-12, atol=0)
    assert whole == per_step  # and the same per-account scenario P&L


def test_an_instrument_listed_between_steps_drops_the_round_instead_of_failing():
    deposits, events = account_events(60)
    _, proc = replay(deposits + events)
    run = proc.stress_run()
    assert run.step(7)
    proc.apply_instrument(dict(id="BTC-NEW-PERP", kind="PERPETUAL", underlying="BTC",
                               settlement="LINEAR", multiplier=1.0, strike=None, expiry=None,
                               lot_size=0.001))
    assert run.step(7) is False and run.rows("w") == []
    assert proc.stress("w")  # the next round, started afresh, is whole
