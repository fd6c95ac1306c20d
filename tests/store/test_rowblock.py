"""Native blocks of the columnar tables (streams/rowblock.py), checked against ClickHouse itself
(the embedded engine): its own ``FORMAT Native`` writer, and clickhouse-connect's own encoder
for the same rows."""
import asyncio
import time

import numpy as np
import orjson
import pytest

from streams import rowblock
from streams.settings import Settings
from streams.store import ClickHouseSink, Store

NOW_MS = int(time.time() * 1000) // 1000 * 1000 - 86_400_000  # inside the tables' TTL


def _snapshots(n, seed=1, names=None):
    rng = np.random.default_rng(seed)
    return {
        "account": names or [f"acct-{k:06d}" for k in range(n)],
        "ts": NOW_MS + rng.integers(0, 10_000, n).astype(np.int64),
        "state": [("HEALTHY", "WARNING", "MARGIN_CALL", "LIQUIDATION")[k % 4]
                  for k in range(n)],
        "equity": rng.normal(1e5, 3e4, n), "im": rng.random(n) * 1e4,
        "mm": rng.random(n) * 7e3, "margin_ratio": rng.random(n),
        "shortfall": np.where(rng.random(n) < 0.2, rng.random(n) * 100, 0.0),
        "worst_underlying": [("BTC", "ETH", "")[k % 3] for k in range(n)],
        "worst_scenario": rng.integers(-1, 33, n).astype(np.int16),
        "worst_pnl": -rng.random(n) * 1e4 * np.pi,  # floats without a short decimal form
        "trigger": [("QUOTE", "TRADE", "COLLATERAL")[k % 3] for k in range(n)],
        "params_version": np.full(n, 7, dtype=np.int64),
        "seq": np.arange(n, dtype=np.int64) * 2**33 + 5,
    }


def _exposures(n, seed=2):
    rng = np.random.default_rng(seed)
    return {"account": [f"acct-{k // 2:06d}" for k in range(n)],
            "underlying": ["BTC", "ETH"] * (n // 2),
            "ts": np.full(n, NOW_MS, dtype=np.int64), "delta": rng.normal(0, 3, n),
            "gamma": rng.normal(0, 1e-5, n), "vega": rng.normal(0, 50, n),
            "theta": rng.normal(0, 9, n)}


@pytest.fixture
def store(tmp_path):
    st = Store(Settings(clickhouse_dsn=f"chdb://{tmp_path / 'ch'}"))
    st.migrate()
    yield st
    st.close()


def _select_native(st, table, n):
    """ClickHouse's own Native bytes of the first n rows of ``table`` (text as String)."""
    cols = ", ".join(f"CAST({c} AS String) AS {c}" if t == "String" else c
                     for c, t in rowblock.TYPES[table])
    return st.client.raw_query(f"SELECT {cols} FROM {st.db}.{table} ORDER BY account, ts "
                               f"LIMIT {n}", fmt="Native")


@pytest.mark.parametrize("table,cols", [("risk_snapshots", _snapshots(500)),
                                        ("exposures", _exposures(600)),
                                        # a unit of work's few rows: text laid out by the
                                        # small-block loop, not the numpy pass
                                        ("risk_snapshots", _snapshots(7)),
                                        ("exposures", _exposures(6))])
def test_blocks_are_byte_identical_to_clickhouses_own_native_output(store, table, cols):
    """Rows inserted through clickhouse-connect's own encoder, read back by ClickHouse as
    Native: the same bytes as this module's block of those rows."""
    rows = rowblock.column_rows(table, cols)
    store.client.insert(f"{store.db}.{table}", rows, column_names=rowblock.COLUMNS[table])
    order = sorted(range(len(rows)), key=lambda k: (cols["account"][k], cols["ts"][k]))
    ordered = {c: [v[k] for k in order] if isinstance(v, list) else np.asarray(v)[order]
               for c, v in cols.items()}
    assert rowblock.block(table, ordered) == _select_native(store, table, len(rows))


def test_blocks_store_exactly_what_clickhouse_connect_stores(store):
    """The same rows through both paths into twin tables: equal, floats bit for bit, times to
    the millisecond, and many blocks joined into one insert."""
    cols = _snapshots(3000, names=[f"acct-{k:06d}" if k % 5 else f"konto-ü{k}-" + "x" * 130
                                   for k in range(3000)])  # UTF-8 and long names too
    db = store.db
    store.client.command(f"CREATE TABLE {db}.twin AS {db}.risk_snapshots")
    store.client.insert(f"{db}.twin", rowblock.column_rows("risk_snapshots", cols),
                        column_names=rowblock.COLUMNS["risk_snapshots"])
    msgs, rejected = rowblock.encode("risk_snapshots", cols, chunk=700)
    assert rejected == [] and len(msgs) == 5
    blocks = rowblock.Blocks(rowblock.split(v)[1] for _, v in msgs)
    assert rowblock.n_rows(blocks) == 3000
    store.client.raw_insert(f"{db}.risk_snapshots", rowblock.COLUMNS["risk_snapshots"],
                            b"".join(blocks), fmt="Native")
    q = ("SELECT account, toUnixTimestamp64Milli(ts), state, reinterpretAsUInt64(equity), "
         "reinterpretAsUInt64(worst_pnl), worst_scenario, worst_underlying, trigger, "
         "params_version, seq FROM {db}.{t} ORDER BY account, ts, seq")
    ours = store.client.query(q.format(db=db, t="risk_snapshots")).result_rows
    theirs = store.client.query(q.format(db=db, t="twin")).result_rows
    assert len(ours) == 3000 and ours == theirs


@pytest.mark.parametrize("n", [1, 5, rowblock._SMALL, rowblock._SMALL + 1, 300])
def test_text_columns_encode_alike_on_both_paths(n):
    """The small-block loop and the numpy pass lay out the same bytes: ASCII, empty,
    multi-byte UTF-8 and values over 127 bytes (a two-byte length) included."""
    pool = ["acct-000001", "", "BTC", "compte-é", "x" * 130, "口座-7", "ETH", "y" * 127]
    vals = [pool[k % len(pool)] for k in range(n)]
    want = b"".join(rowblock._text(v) for v in vals)
    assert rowblock._strings(vals) == want
    assert rowblock._strings_small(vals) == want
    ascii_short = [f"acct-{k:06d}" for k in range(n)]
    assert rowblock._strings(ascii_short) == b"".join(rowblock._text(v) for v in ascii_short)


def test_decode_reads_back_what_was_encoded():
    cols = _snapshots(300, names=[f"ü-{k}-" + "y" * k for k in range(300)])
    got = rowblock.decode(rowblock.block("risk_snapshots", cols))
    for c, typ in rowblock.TYPES["risk_snapshots"]:
        if typ == "String":
            assert got[c] == cols[c]
        else:
            assert np.array_equal(got[c], np.asarray(cols[c]).astype(got[c].dtype))
    pnl = {"account": ["a", "b"], "underlying": ["BTC", "ETH"], "scenario": [0, 65535],
           "ts": [NOW_MS, NOW_MS + 1], "pnl": [-1.5, 2.25]}
    back = rowblock.decode(rowblock.block("scenario_pnl", pnl))
    assert back["scenario"].tolist() == [0, 65535] and back["pnl"].tolist() == [-1.5, 2.25]


def test_rows_a_table_cannot_hold_are_rejected_with_their_reason_before_encoding():
    cols = _snapshots(6)
    cols["equity"][1] = np.nan
    cols["worst_pnl"][2] = np.inf
    cols["params_version"][3] = -1
    cols["worst_scenario"] = cols["worst_scenario"].astype(np.int64)
    cols["worst_scenario"][4] = 40_000
    msgs, rejected = rowblock.encode("risk_snapshots", cols)
    assert [r[0][0] for r in rejected] == ["acct-000001", "acct-000002", "acct-000003",
                                           "acct-000004"]
    reasons = [why for _, why in rejected]
    assert reasons[0].startswith("non-finite equity") and "worst_pnl" in reasons[1]
    assert "params_version's range" in reasons[2] and "worst_scenario's range" in reasons[3]
    kept = rowblock.decode(rowblock.split(msgs[0][1])[1])
    assert kept["account"] == ["acct-000000", "acct-000005"]
    assert rowblock.encode("exposures", {}) == ([], [])  # a round without rows


def test_the_sink_stores_native_and_earlier_json_messages_of_one_batch_once(store):
    """A batch mixing Native messages with JSON ones (the framing of earlier versions, and
    stress rows): one insert per table, every row stored, and the batch retried (same offsets)
    stored once."""
    s = Settings(clickhouse_dsn="chdb:///unused")
    sink = ClickHouseSink(s, store=store)
    new = _snapshots(40)
    old = _snapshots(10, seed=5, names=[f"old-{k}" for k in range(10)])
    legacy = orjson.dumps({"risk_snapshots": old}, option=orjson.OPT_SERIALIZE_NUMPY)
    stress = orjson.dumps({"stress": [[NOW_MS, "w1", "BTC", 0, -0.1, 1, 1.0, 10, 2, 55.5]]})
    values = [v for _, v in rowblock.messages("risk_snapshots", new, chunk=16)]
    values += [legacy, stress]
    values += [v for _, v in rowblock.messages("exposures", _exposures(8))]
    seen = []
    sink.on_batch = seen.append
    for _ in range(2):
        asyncio.run(sink.write_messages(values, "risk-snapshots[0]@0-99"))
    assert len(seen) == 6  # snapshots, exposures and stress, twice
    got = store.query(f"SELECT count(), uniqExact(account) FROM {store.db}.risk_snapshots"
                      ).result_rows
    assert got == [(50, 50)]
    assert store.query(f"SELECT count() FROM {store.db}.exposures").result_rows == [(8,)]
    # the stress table keeps no deduplication window: its replays collapse under FINAL
    assert store.query(f"SELECT uncovered_loss FROM {store.db}.stress FINAL").result_rows == \
        [(55.5,)]
