"""Risk snapshot and exposure rows, as the sink receives them (Native blocks on the internal
topic, decoded), do not depend on how input was batched, and keep their types: numbers stay
exact integers where the table has integers (times, sequence numbers, versions) whichever way
the columns were merged across rounds."""
import numpy as np

from streams import rowblock
from streams.processor import EXPOSURE_COLUMNS, SNAPSHOT_COLUMNS, Output
from tests.pipeline.workload import account_events, steady_processor


def _rows(out: Output, table: str) -> list[tuple]:
    name = "risk_snapshots" if table == "snap" else "exposures"
    msgs, rejected = rowblock.encode(name, out.snapshots if table == "snap" else out.exposures,
                                     chunk=7)  # several blocks per table
    assert rejected == []
    if not msgs:
        return []
    cols = rowblock.decode(b"".join(rowblock.split(v)[1] for _, v in msgs))
    cols = {c: v.tolist() if isinstance(v, np.ndarray) else v for c, v in cols.items()}
    names = SNAPSHOT_COLUMNS if table == "snap" else EXPOSURE_COLUMNS
    n = len(cols.get("account", []))
    return [tuple(cols[c][k] for c in names) for k in range(n)]


def _run(batches) -> Output:
    proc = steady_processor()
    total = Output()
    for batch in batches:
        total.extend(proc.apply_account_events(batch))
    return total


def test_rows_equal_one_by_one_and_in_one_batch():
    deposits, trades = account_events(60)
    events = [(name, rec, topic, 0, k) for k, (topic, name, rec) in
              enumerate(deposits + trades)]
    one_by_one = _run([[e] for e in events])
    one_batch = _run([events])  # several rounds: accounts repeat within the batch
    for table in ("snap", "expo"):
        a, b = _rows(one_by_one, table), _rows(one_batch, table)
        assert len(a) >= len(events) if table == "snap" else len(a) > 0
        assert sorted(a) == sorted(b)
    for row in _rows(one_batch, "snap"):
        ts, seq, version, scenario = row[1], row[13], row[12], row[9]
        assert all(type(v) is int for v in (ts, seq, version, scenario)), row
    for row in _rows(one_batch, "expo"):
        assert type(row[2]) is int, row


def test_merging_an_empty_exposure_round_keeps_integer_times():
    proc = steady_processor()
    deposits, trades = account_events(3)
    first = proc.apply_account_events([(n, r, t, 0, k) for k, (t, n, r) in
                                       enumerate(deposits[:1])])  # cash only: no greeks
    assert len(first.exposures["account"]) == 0
    second = proc.apply_account_events([(n, r, t, 0, 100 + k) for k, (t, n, r) in
                                        enumerate(trades[:1])])
    merged = Output()
    merged.extend(first)
    merged.extend(second)
    rows = _rows(merged, "expo")
    assert rows and all(type(r[2]) is int for r in rows)


def test_periodic_snapshots_are_spread_over_the_window():
    """20,000 accounts re-margined by a market tick every 100 ms for 5 s, snapshots at most once
    a second: each account gets one snapshot in every one of its windows (never two), and the
    ticks share the rows evenly instead of one tick writing the whole book."""
    from streams.processor import _window_passed
    rows = np.arange(20_000, dtype=np.int64)
    last = np.full(rows.size, -1e18)
    per_tick, per_account = [], np.zeros(rows.size, dtype=np.int64)
    for k in range(51):
        now = 1_800_000_000_000.0 + 100.0 * k
        due = _window_passed(rows, last, now, 1000)
        last[due] = now
        per_tick.append(int(due.sum()))
        if k:
            per_account += due
    assert per_tick[0] == rows.size  # none before: all due
    assert np.all(per_account == 5)  # 5 s of ticks after the first: one per window each
    assert max(per_tick[1:]) <= rows.size * 0.1 * 1.05  # a tenth of the book per tick, evenly
    assert min(per_tick[1:]) >= rows.size * 0.1 * 0.95
    assert np.array_equal(_window_passed(rows, last, now, 0), np.ones(rows.size, bool))


def test_mixed_rounds_equal_one_by_one():
    """Trades and collateral changes, batched, against the same events one at a time: the same
    margin events (ids, figures, sources), rejections and account records, byte for byte.
    The changes include withdrawals that put accounts into margin calls, an asset new to the
    book, a withdrawal past the balance limit (rejected by the engine) and a replay."""
    import random
    deposits, trades = account_events(40)
    rng = random.Random(5)
    mixed = []
    for k, (topic, name, rec) in enumerate(trades):
        mixed.append((topic, name, rec))
        if rng.random() < 0.4:
            a = rec["account"]
            amount = rng.choice([-15_000.0, -5_000.0, 2_500.0, 0.5, -9.9e8])
            asset = "ETH" if rng.random() < 0.1 else "USD"
            mixed.append(("collateral", "CollateralChange", dict(
                change_id=f"{a}-x{k}", account=a, asset=asset, amount=amount,
                kind="TRANSFER", ts=rec["ts"])))
    events = [(name, rec, topic, 0, k) for k, (topic, name, rec) in
              enumerate(deposits + mixed)]
    events.append(events[len(deposits) + 3])  # a replay: skipped both ways

    def run(batches):
        proc = steady_processor()
        total = Output()
        for batch in batches:
            total.extend(proc.apply_account_events(batch))
        records = {a: proc.account_record_bytes(a) for a in sorted(proc.book.ids)}
        return total, records

    (one, rec_one), (many, rec_many) = run([[e] for e in events]), run([events])
    by_id = lambda evs: sorted(evs, key=lambda e: e["event_id"])  # noqa: E731
    assert by_id(many.events) == by_id(one.events)  # a batch emits round by round
    assert len(one.events) > 20 and any(e["trigger"] == "COLLATERAL" for e in one.events)
    assert all(e["sources"] and e["sources"][0]["topic"] in ("trades", "collateral")
               for e in one.events)
    assert sorted((r.offset, r.error_type, r.reason) for r in many.rejected) == \
        sorted((r.offset, r.error_type, r.reason) for r in one.rejected)
    assert len(one.rejected) > 3
    assert rec_many == rec_one
