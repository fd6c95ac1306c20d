"""The results store on the embedded ClickHouse engine (chDB through clickhouse-connect)."""
import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from streams.settings import Settings
from streams.store import ClickHouseSink, Store, open_store

# recent timestamps: rows older than the TTL (90 days by default) are dropped on insert
TS = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=1)
TS2 = TS + timedelta(hours=1)


@pytest.fixture
def store_settings(tmp_path):
    return Settings(clickhouse_dsn=f"chdb://{tmp_path / 'ch'}")


def test_migrations_twice_are_a_noop(store_settings):
    with open_store(store_settings) as st:
        first = st.migrate()
        assert [m.split(":")[0] for m in first] == ["1", "2", "3"]
        assert st.migrate() == []
        tables = {r[0] for r in st.query("SHOW TABLES FROM riskpipe").result_rows}
        assert {"risk_snapshots", "margin_events", "account_latest", "exposures", "stress",
                "exchange_stress", "schema_migrations"} <= tables
        assert st.query("SELECT count() FROM riskpipe.schema_migrations").result_rows == [(3,)]


def _snap(acct, equity, im, ts=TS, seq=0, state="HEALTHY"):
    return [acct, ts, state, equity, im, im * 0.75, im * 0.75 / equity, max(im - equity, 0),
            "BTC", 3, -im, "TRADE", 1, seq]


def test_retried_batch_is_stored_once_and_latest_uses_final(store_settings):
    st = Store(store_settings)
    st.migrate()
    sink = ClickHouseSink(store_settings, store=st)
    rows = [_snap("a", 100.0, 50.0), _snap("b", 100.0, 150.0, state="MARGIN_CALL")]

    async def go():
        await sink.write("risk_snapshots", rows, "snap[0]0-1")
        await sink.write("risk_snapshots", rows, "snap[0]0-1")  # retry: same token
        await sink.write("risk_snapshots", [_snap("a", 40.0, 50.0, ts=TS2, seq=1, state="MARGIN_CALL")], "snap[0]2-2")
    asyncio.run(go())
    assert st.query("SELECT count() FROM riskpipe.risk_snapshots").result_rows == [(3,)]
    latest = dict((r[0], (r[1], r[2])) for r in st.named("latest").result_rows)
    assert latest == {"a": ("MARGIN_CALL", 40.0), "b": ("MARGIN_CALL", 100.0)}
    short = st.named("top-shortfalls").result_rows
    assert [(r[0], r[2]) for r in short] == [("b", 50.0), ("a", 10.0)]
    states = dict(st.named("states").result_rows)
    assert states == {"MARGIN_CALL": 2}
    st.close()


def test_stress_view_sums_workers(store_settings):
    st = Store(store_settings)
    st.migrate()
    sink = ClickHouseSink(store_settings, store=st)
    rows = [[TS, "w1", "BTC", 0, -0.3, 0, 1.0, 10, 2, 1500.0],
            [TS, "w2", "BTC", 0, -0.3, 0, 1.0, 5, 1, 500.0],
            [TS, "w1", "BTC", 1, 0.3, 0, 1.0, 10, 0, 0.0]]
    asyncio.run(sink.write("stress", rows, "x"))
    got = st.named("stress").result_rows
    assert got[0][:2] == ("BTC", 0) and got[0][4:] == (15, 3, 2000.0)
    st.close()


def test_dsn_password_is_redacted():
    s = Settings(clickhouse_dsn="https://ops:s3cret@ch.example:8443/risk")
    assert "s3cret" not in s.clickhouse_dsn_redacted and "ops:***@" in s.clickhouse_dsn_redacted
    assert Store.__init__  # the http path uses the same Store class (no server here)


def test_scenario_pnl_rows_from_the_processor_match_the_engine(store_settings):
    """The optional per-account scenario P&L: rows built by the processor land in the table
    and equal the engine's scenario P&L."""
    from streams.store import snapshot_columns
    from tests.pipeline.workload import INSTRUMENTS, T0 as W0, quotes
    from streams.processor import RiskProcessor
    proc = RiskProcessor()
    for i in INSTRUMENTS:
        proc.apply_instrument(i)
    for q in quotes():
        proc.apply_quote(q)
    proc.apply_account_events([
        ("CollateralChange", dict(account="a", asset="USD", amount=50_000.0, ts=W0), "c", 0, 0),
        ("Trade", dict(account="a", instrument="BTC-55000-P", quantity=-3.0, price=100.0,
                       fee=0.0, ts=W0), "t", 0, 0)])
    per = {}
    stress = proc.stress("w", per)
    n_scen = proc.risk_set().weight.shape[1]
    assert len(per["account"]) == n_scen and len(stress) == n_scen
    res = proc.book.margin(proc.risk_set(), scenario_pnl=True)
    assert per["pnl"] == res.scenario_pnl[0, 0].tolist()
    rows = snapshot_columns([{"scenario_pnl": {**per, "ts": [int(TS.timestamp() * 1000)] *
                                                len(per["ts"])}}])["scenario_pnl"]
    st = Store(store_settings)
    st.migrate()
    asyncio.run(ClickHouseSink(store_settings, store=st).write("scenario_pnl", rows, "x"))
    got = st.query("SELECT min(pnl), count() FROM riskpipe.scenario_pnl FINAL").result_rows
    assert got == [(min(per["pnl"]), n_scen)]
    st.close()


def test_rows_the_server_rejects_go_to_the_rejection_handler(store_settings):
    """A bad row in a batch: the good rows are stored, the bad one is handed over (the worker
    dead-letters it) with the server's error."""
    st = Store(store_settings)
    st.migrate()
    rejected = []

    async def on_rejected(table, row, error):
        rejected.append((table, row[0], error))

    sink = ClickHouseSink(store_settings, store=st, on_rejected=on_rejected)
    bad = _snap("bad", 100.0, 50.0)
    bad[9] = 10**9  # worst_scenario is Int16 in the schema: out of range for the server
    rows = [_snap("ok1", 100.0, 50.0), bad, _snap("ok2", 100.0, 50.0)]
    asyncio.run(sink.write("risk_snapshots", rows, "bad-batch"))
    stored = {r[0] for r in st.query("SELECT account FROM riskpipe.risk_snapshots").result_rows}
    st.close()
    assert stored == {"ok1", "ok2"}
    assert [(t, a) for t, a, _ in rejected] == [("risk_snapshots", "bad")]
    assert rejected[0][2]


def test_columnar_batches_keep_millisecond_times_and_reject_bad_rows(store_settings):
    """Snapshot columns go in as a Native block: event times keep their milliseconds, and rows
    the table cannot hold (a non-finite figure, an out-of-range field) are handed over one by
    one while the rest of the batch is stored."""
    from streams.store import COLUMNS
    st = Store(store_settings)
    st.migrate()
    rejected = []

    async def on_rejected(table, row, error):
        rejected.append((row[0], error))

    rows = [_snap("ok1", 100.0, 50.0), _snap("nan", float("nan"), 50.0),
            _snap("big", 100.0, 50.0), _snap("ok2", 100.0, 50.0)]
    rows[2][9] = 10**9
    cols = {c: [r[k] for r in rows] for k, c in enumerate(COLUMNS["risk_snapshots"])}
    ms = [int(TS.timestamp() * 1000) + k for k in (1, 2, 3, 999)]
    cols["ts"] = ms
    sink = ClickHouseSink(store_settings, store=st, on_rejected=on_rejected)
    asyncio.run(sink.write("risk_snapshots", cols, "cols-batch"))
    got = st.query("SELECT account, toUnixTimestamp64Milli(ts) FROM riskpipe.risk_snapshots "
                   "ORDER BY account").result_rows
    st.close()
    assert got == [("ok1", ms[0]), ("ok2", ms[3])]
    assert sorted(a for a, _ in rejected) == ["big", "nan"] and all(e for _, e in rejected)
