"""Periodic risk snapshots of market ticks: spread over the window in a steady market, and
after a quiet spell (no tick for longer than the window, every account due at once) spread
again over about one window instead of one row per account in the first tick."""
import numpy as np
import orjson
import pytest

from streams.processor import Output, RiskProcessor
from tests.pipeline.workload import account_events, market_ready, quotes

N = 300


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _processor(clock, share_limit=True):
    proc = market_ready(RiskProcessor(snapshot_interval_ms=1000, clock=clock))
    if not share_limit:
        proc._snapshot_share = lambda now: 1.0  # the rule before the share: every due row
    deposits, _ = account_events(N)
    proc.apply_account_events([(n, r, t, 0, k) for k, (t, n, r) in enumerate(deposits)])
    # positions in the moving underlying, one each (deposits alone hold no BTC)
    trades = [("Trade", dict(trade_id=f"t{k}", account=f"acct-{k:04d}", instrument="BTC-PERP",
                             quantity=0.01, price=60_000.0, fee=0.0, ts=0), "trades", 0, k)
              for k in range(N)]
    proc.apply_account_events(trades)
    return proc


def _tick(proc, clock, t, k, stepped) -> Output:
    clock.t = t
    for q in quotes(60_000.0 + (k % 7)):  # small moves: no state changes
        proc.apply_quote(q)
    if not stepped:
        return proc.on_market_tick()
    _, rows, ts = proc.start_tick()
    job = proc.tick_job(rows)
    res = job.run()
    out = Output()
    for lo, hi in proc.tick_steps(rows.size, min_step=64):
        out.extend(proc.finish_tick_job(job, res, lo, hi, "QUOTE", ts))
    return out


def _written(out: Output) -> list[str]:
    return list(out.snapshots.get("account", []))


@pytest.mark.parametrize("gap_s", [0.1, 0.6])
def test_a_steady_market_writes_what_it_wrote_without_the_share(gap_s):
    """Ticks every 100 ms (a tenth of the book due per tick) or every 600 ms (over half): the
    share never holds a row back, so the rows are those of the plain window rule."""
    ca, cb = Clock(1_800_000_000.0), Clock(1_800_000_000.0)
    a, b = _processor(ca), _processor(cb, share_limit=False)
    for k in range(int(4 / gap_s)):
        t = 1_800_000_000.0 + 2 + k * gap_s
        oa, ob = _tick(a, ca, t, k, False), _tick(b, cb, t, k, False)
        assert orjson.dumps(oa.snapshots, option=orjson.OPT_SERIALIZE_NUMPY) == \
            orjson.dumps(ob.snapshots, option=orjson.OPT_SERIALIZE_NUMPY)
        assert not oa.events
    assert a._tick_share == (0.2 if gap_s == 0.1 else 1.0)


@pytest.mark.parametrize("stepped", [False, True])
def test_after_a_quiet_spell_the_book_is_spread_over_about_one_window(stepped):
    clock = Clock(1_800_000_000.0)
    proc = _processor(clock)
    t = 1_800_000_002.0
    for k in range(30):  # a steady market: ticks every 100 ms
        _tick(proc, clock, t + k * 0.1, k, stepped)
    t += 30 * 0.1 + 5.0  # quiet for 5 s: every account's window has passed
    before_last = proc._last_snap[:N].copy()
    first = _written(_tick(proc, clock, t, 0, stepped))
    # the cadence's share, not the whole book (rounded up in each of a stepped tick's steps)
    limit = int(np.ceil(0.2 * N)) + (len(proc.tick_steps(N, min_step=64)) if stepped else 0)
    assert len(first) <= limit
    assert len(first) >= 0.2 * N - 1
    if not stepped:  # oldest snapshot first (a stepped tick: within each step)
        rows = np.array([proc.book.row(a) for a in first])
        others = np.setdiff1d(np.arange(N), rows)
        assert before_last[rows].max() <= before_last[others].min()
    seen = set(first)
    per_tick = []
    for k in range(1, 12):  # the next 1.1 s at the steady cadence
        got = _written(_tick(proc, clock, t + k * 0.1, k, stepped))
        per_tick.append(len(got))
        seen |= set(got)
    assert seen == {f"acct-{k:04d}" for k in range(N)}  # everyone within about a window
    assert max(per_tick) <= limit


def test_the_share_follows_the_cadence_not_one_odd_gap():
    proc = RiskProcessor(snapshot_interval_ms=1000)
    shares = [proc._snapshot_share(t) for t in
              (1000.0, 1100.0, 1200.0, 1300.0,  # every 100 ms: 0.2
               6300.0,                          # after 5 s of quiet: still 0.2
               6305.0,                          # a tick re-run at once: still 0.2
               6405.0, 6505.0)]
    assert shares == [1.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
    slow = RiskProcessor(snapshot_interval_ms=1000)
    assert [slow._snapshot_share(t) for t in (0.5, 600.5, 1200.5, 1800.5)][1:] == [1.0] * 3
    # a worker's first tick, before any gap: its coalescing interval stands in for the cadence
    # (a restart's first tick writes a fifth of the overdue book, not all of it)
    worker = RiskProcessor(snapshot_interval_ms=1000, tick_interval_ms=100)
    assert [worker._snapshot_share(t) for t in (1000.0, 1100.0, 1700.0, 2300.0)] == \
        [0.2, 0.2, 0.2, 1.0]
