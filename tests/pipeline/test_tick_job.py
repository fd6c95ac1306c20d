"""A market tick as the worker runs it (kernel off the event loop on a MarginJob, outputs
derived in steps) gives the same states, margin events and snapshot rows as the tick in one
call; accounts traded while its kernel ran are left to their own batch."""
import numpy as np
import orjson
import pytest

from streams.processor import Output, RiskProcessor
from tests.pipeline.workload import account_events, market_ready, quotes


def _processor(n_accounts=80, interval=0):
    proc = market_ready(RiskProcessor(snapshot_interval_ms=interval,
                                      clock=lambda: 1_800_000_000.0))
    deposits, trades = account_events(n_accounts)
    proc.apply_account_events([(n, r, t, 0, k) for k, (t, n, r) in
                               enumerate(deposits + trades)])
    return proc, trades


def _crash(proc, pct):
    for q in quotes(60_000.0 * (1 - pct)):
        proc.apply_quote(q)


def _stepped(proc, min_step):
    _, rows, t = proc.start_tick()
    job = proc.tick_job(rows)
    res = job.run()
    out = Output()
    for lo, hi in proc.tick_steps(rows.size, min_step=min_step):
        out.extend(proc.finish_tick_job(job, res, lo, hi, "QUOTE", t))
    return out


def _dump(out):
    return (orjson.dumps(out.snapshots, option=orjson.OPT_SERIALIZE_NUMPY),
            orjson.dumps(out.exposures, option=orjson.OPT_SERIALIZE_NUMPY),
            [(e["event_id"], e["state"], e["equity"], e["im"], e["mm"]) for e in out.events])


@pytest.mark.parametrize("interval", [0, 1000])
def test_stepped_tick_equals_the_tick_in_one_call(interval):
    """With snapshots due for every account (interval 0), and for none but the accounts whose
    state changes (a fixed clock inside the window): the stepped tick skips the others."""
    a, _ = _processor(interval=interval)
    b, _ = _processor(interval=interval)
    _crash(a, 0.25)
    _crash(b, 0.25)
    one = a.on_market_tick()
    stepped = _stepped(b, min_step=7)
    assert one.events  # the crash moved accounts between states
    assert _dump(one) == _dump(stepped)
    assert a.state == b.state and a.seq == b.seq
    n_snap = len(one.snapshots["account"])
    assert n_snap == (a.holders(["BTC"])[0].size if interval == 0 else len(one.events))


def test_accounts_traded_while_the_kernel_runs_are_left_to_their_batch():
    proc, trades = _processor()
    _crash(proc, 0.25)
    _, rows, t = proc.start_tick()
    job = proc.tick_job(rows)
    traded = trades[:5]
    batch = proc.apply_account_events([(n, r, tp, 0, 10_000 + k) for k, (tp, n, r) in
                                       enumerate(traded)])
    accts = {r["account"] for _, _, r in traded}
    assert accts <= set(batch.snapshots["account"])  # margined by their own batch
    res = job.run()
    out = Output()
    for lo, hi in proc.tick_steps(rows.size, min_step=7):
        out.extend(proc.finish_tick_job(job, res, lo, hi, "QUOTE", t))
    got = list(out.snapshots["account"])
    assert not accts & set(got)
    assert len(got) == rows.size - len(accts & {proc.book.ids[r] for r in rows})
    # the others: their tick figures are their margin now
    keep = np.array([proc.book.row(a) for a in got], dtype=np.int64)
    now = proc.book.margin(proc.risk_set(), keep)
    assert np.array_equal(np.asarray(out.snapshots["equity"]), now.equity)
    assert np.array_equal(np.asarray(out.snapshots["im"]), now.im)


def test_a_market_change_during_the_kernel_voids_the_tick():
    proc, _ = _processor()
    _crash(proc, 0.1)
    _, rows, t = proc.start_tick()
    job = proc.tick_job(rows)
    _crash(proc, 0.2)  # a new quote: the risk set the job used is stale
    proc.risk_set()
    assert proc.finish_tick_job(job, job.run(), 0, rows.size, "QUOTE", t) is None
