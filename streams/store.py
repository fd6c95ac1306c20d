"""ClickHouse results store: migrations, the batching sink, named queries.

One DSN, two targets, one code path (clickhouse-connect):
* ``chdb:///path``: the real ClickHouse engine in-process (chDB), the embedded default;
* ``http(s)://user:password@host:8123/db``: a ClickHouse server.

The embedded engine allows one process per data path. An analyst therefore queries either
between runs (``riskpipe sql``) or, while a worker runs, through the worker's read-only SQL
endpoint on its loopback web port (``riskpipe sql --worker http://127.0.0.1:6066``), which runs
queries on the worker's own client with ``readonly=1``.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import clickhouse_connect
import orjson

from . import rowblock
from .rowblock import Blocks, column_rows
from .settings import Settings

log = logging.getLogger(__name__)
DB = "riskpipe"

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "core tables", [
        """CREATE TABLE IF NOT EXISTS {db}.risk_snapshots (
            account String, ts DateTime64(3, 'UTC'), state LowCardinality(String),
            equity Float64, im Float64, mm Float64, margin_ratio Float64, shortfall Float64,
            worst_underlying LowCardinality(String), worst_scenario Int16, worst_pnl Float64,
            trigger LowCardinality(String), params_version UInt64, seq UInt64
        ) ENGINE = ReplacingMergeTree PARTITION BY toDate(ts)
        ORDER BY (account, ts, seq, trigger)
        TTL toDateTime(ts) + INTERVAL {ttl} DAY
        SETTINGS non_replicated_deduplication_window = 100000""",
        """CREATE TABLE IF NOT EXISTS {db}.margin_events (
            event_id String, account String, seq UInt64, prev_state LowCardinality(String),
            state LowCardinality(String), equity Float64, im Float64, mm Float64,
            margin_ratio Float64, shortfall Float64, worst_underlying LowCardinality(String),
            worst_scenario Int16, worst_pnl Float64, trigger LowCardinality(String),
            params_version UInt64, liquidation_plan String, ts DateTime64(3, 'UTC')
        ) ENGINE = ReplacingMergeTree ORDER BY (account, seq)
        SETTINGS non_replicated_deduplication_window = 100000""",
        """CREATE TABLE IF NOT EXISTS {db}.exposures (
            account String, underlying LowCardinality(String), ts DateTime64(3, 'UTC'),
            delta Float64, gamma Float64, vega Float64, theta Float64
        ) ENGINE = ReplacingMergeTree PARTITION BY toDate(ts)
        ORDER BY (account, underlying, ts)
        TTL toDateTime(ts) + INTERVAL {ttl} DAY
        SETTINGS non_replicated_deduplication_window = 100000""",
        """CREATE TABLE IF NOT EXISTS {db}.account_latest (
            account String, ts DateTime64(3, 'UTC'), seq UInt64, state LowCardinality(String),
            equity Float64, im Float64, mm Float64, margin_ratio Float64, shortfall Float64,
            worst_underlying LowCardinality(String), worst_pnl Float64
        ) ENGINE = ReplacingMergeTree(ts) ORDER BY account""",
        """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.account_latest_mv TO {db}.account_latest
        AS SELECT account, ts, seq, state, equity, im, mm, margin_ratio, shortfall,
                  worst_underlying, worst_pnl FROM {db}.risk_snapshots""",
        """CREATE TABLE IF NOT EXISTS {db}.exposure_latest (
            account String, underlying LowCardinality(String), ts DateTime64(3, 'UTC'),
            delta Float64, gamma Float64, vega Float64, theta Float64
        ) ENGINE = ReplacingMergeTree(ts) ORDER BY (account, underlying)""",
        """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.exposure_latest_mv
        TO {db}.exposure_latest AS SELECT * FROM {db}.exposures""",
    ]),
    (2, "exchange-wide stress", [
        """CREATE TABLE IF NOT EXISTS {db}.stress (
            ts DateTime64(3, 'UTC'), worker String, underlying LowCardinality(String),
            scenario UInt16, price_move Float64, vol_shock_sign Int8, weight Float64,
            accounts UInt64, accounts_negative UInt64, uncovered_loss Float64
        ) ENGINE = ReplacingMergeTree(ts) ORDER BY (worker, underlying, scenario)""",
        """CREATE VIEW IF NOT EXISTS {db}.exchange_stress AS
        SELECT underlying, scenario, any(price_move) AS price_move,
               any(vol_shock_sign) AS vol_shock_sign, any(weight) AS weight,
               sum(accounts) AS accounts, sum(accounts_negative) AS accounts_negative,
               sum(uncovered_loss) AS uncovered_loss, max(ts) AS as_of
        FROM {db}.stress FINAL GROUP BY underlying, scenario""",
    ]),
    (3, "per-account scenario P&L (written only with RISKPIPE_SCENARIO_PNL=true)", [
        """CREATE TABLE IF NOT EXISTS {db}.scenario_pnl (
            account String, underlying LowCardinality(String), scenario UInt16,
            ts DateTime64(3, 'UTC'), pnl Float64
        ) ENGINE = ReplacingMergeTree(ts) ORDER BY (account, underlying, scenario)
        TTL toDateTime(ts) + INTERVAL {ttl} DAY""",
    ]),
]

NAMED_QUERIES = {
    "latest": ("Latest state of every account (deduplicated with FINAL)",
               "SELECT account, state, equity, im, mm, margin_ratio, shortfall, ts "
               "FROM {db}.account_latest FINAL ORDER BY margin_ratio DESC LIMIT {limit}"),
    "top-shortfalls": ("Accounts furthest below initial margin",
                       "SELECT account, state, shortfall, equity, im, mm, worst_underlying "
                       "FROM {db}.account_latest FINAL WHERE shortfall > 0 "
                       "ORDER BY shortfall DESC LIMIT {limit}"),
    "closest-to-liquidation": ("Accounts by maintenance margin ratio (MM / equity)",
                               "SELECT account, state, margin_ratio, equity, mm "
                               "FROM {db}.account_latest FINAL WHERE mm > 0 "
                               "ORDER BY margin_ratio DESC LIMIT {limit}"),
    "history": ("Margin-call history of one account (--account)",
                "SELECT event_id, ts, prev_state, state, trigger, equity, im, mm, shortfall "
                "FROM {db}.margin_events FINAL WHERE account = {account:String} ORDER BY seq"),
    "exposure": ("Net greeks by underlying across all accounts",
                 "SELECT underlying, sum(delta) AS delta, sum(gamma) AS gamma, "
                 "sum(vega) AS vega, sum(theta) AS theta, count() AS accounts "
                 "FROM {db}.exposure_latest FINAL GROUP BY underlying ORDER BY underlying"),
    "stress": ("Exchange-wide stress: per scenario, accounts with negative equity and the "
               "uncovered loss the insurance fund would absorb",
               "SELECT underlying, scenario, round(price_move, 4) AS price_move, "
               "vol_shock_sign, accounts, accounts_negative, round(uncovered_loss, 2) AS "
               "uncovered_loss FROM {db}.exchange_stress ORDER BY uncovered_loss DESC, "
               "underlying, scenario LIMIT {limit}"),
    "states": ("Accounts per margin state",
               "SELECT state, count() AS accounts FROM {db}.account_latest FINAL "
               "GROUP BY state ORDER BY state"),
}


def connect(dsn: str):
    """A clickhouse-connect client for ``chdb:///path`` or ``http(s)://...`` DSNs."""
    if dsn.startswith("chdb://"):
        Path(urlsplit(dsn).path).mkdir(parents=True, exist_ok=True)
        return clickhouse_connect.get_client(dsn=dsn)
    return clickhouse_connect.get_client(dsn=dsn)


class Store:
    def __init__(self, settings: Settings, client=None):
        self.s = settings
        self.client = client or connect(settings.clickhouse_dsn)
        parts = urlsplit(settings.clickhouse_dsn)
        db = parts.path.strip("/") if parts.scheme.startswith("http") else ""
        self.db = db or DB

    def close(self):
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass

    def migrate(self) -> list[str]:
        """Apply missing migrations in order; re-running is a no-op. Returns what was applied."""
        c = self.client
        c.command(f"CREATE DATABASE IF NOT EXISTS {self.db}")
        c.command(f"CREATE TABLE IF NOT EXISTS {self.db}.schema_migrations (version UInt32, "
                  "name String, applied_at DateTime64(3, 'UTC')) ENGINE = MergeTree "
                  "ORDER BY version")
        done = {r[0] for r in c.query(f"SELECT version FROM {self.db}.schema_migrations")
                .result_rows}
        applied = []
        for version, name, stmts in MIGRATIONS:
            if version in done:
                continue
            for sql in stmts:
                c.command(sql.format(db=self.db, ttl=self.s.snapshot_ttl_days))
            c.insert(f"{self.db}.schema_migrations",
                     [[version, name, datetime.now(timezone.utc)]],
                     column_names=["version", "name", "applied_at"])
            applied.append(f"{version}: {name}")
            log.info("applied ClickHouse migration %d (%s)", version, name)
        return applied

    def query(self, sql: str, parameters=None, readonly: bool = True):
        settings = {"readonly": 1} if readonly and not self.s.clickhouse_dsn.startswith(
            "chdb") else None
        return self.client.query(sql, parameters=parameters or {}, settings=settings)

    def named(self, name: str, limit: int = 20, account: str | None = None):
        if name not in NAMED_QUERIES:
            raise KeyError(f"unknown query {name!r}; known: {', '.join(NAMED_QUERIES)}")
        sql = NAMED_QUERIES[name][1].replace("{db}", self.db).replace("{limit}", str(int(limit)))
        return self.query(sql, {"account": account or ""})


@contextmanager
def open_store(settings: Settings):
    st = Store(settings)
    try:
        yield st
    finally:
        st.close()


SNAPSHOT_COLS = rowblock.COLUMNS["risk_snapshots"]
EVENT_COLS = ["event_id", "account", "seq", "prev_state", "state", "equity", "im", "mm",
              "margin_ratio", "shortfall", "worst_underlying", "worst_scenario", "worst_pnl",
              "trigger", "params_version", "liquidation_plan", "ts"]
EXPOSURE_COLS = rowblock.COLUMNS["exposures"]
SCENARIO_PNL_COLS = rowblock.COLUMNS["scenario_pnl"]
STRESS_COLS = ["ts", "worker", "underlying", "scenario", "price_move", "vol_shock_sign", "weight",
               "accounts", "accounts_negative", "uncovered_loss"]


class ClickHouseSink:
    """Inserts batches of rows that came from Kafka, exactly once per batch of offsets.

    The sink runs as Faust agents on the ``margin-calls`` and internal ``risk-snapshots``
    topics, so a batch's offsets are committed only after its insert succeeded:

    * ``insert_deduplication_token`` = table + source topic/partition/offset range, so a retried
      batch is stored once; rows replayed in other batch shapes after a crash collapse under
      ``FINAL`` (the tables are ReplacingMergeTree keyed by their identity columns);
    * transient errors are retried with exponential backoff for as long as it takes; the agent
      is blocked meanwhile, so the sink stops consuming (backpressure) and Kafka keeps the rows;
    * a batch the server rejects as bad data is retried row by row and the offending rows go
      to ``on_rejected`` (the pipeline dead-letters them with the server's error).
    """

    def __init__(self, settings: Settings, store: Store | None = None, on_rejected=None):
        self.s = settings
        self.store = store
        self.on_rejected = on_rejected
        self.inserted = {t: 0 for t in ("risk_snapshots", "margin_events", "exposures",
                                        "stress", "scenario_pnl")}
        self.on_batch = None  # callable(seconds) per inserted batch (metrics)
        self.retries = 0
        self.pending = 0
        self.down = False
        # chDB is in-process: keep every call to it on one thread
        from concurrent.futures import ThreadPoolExecutor
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")

    def _ensure(self) -> Store:
        if self.store is None:
            self.store = Store(self.s)
            self.store.migrate()
        return self.store

    async def open(self) -> None:
        """Open the store and apply migrations at worker start rather than at the first insert,
        so the first batch of a live stream does not pay for it (and clickhouse-connect's
        lazy optional imports happen here too). Failure is only logged: inserts retry."""
        def warm():
            self._ensure()
            from clickhouse_connect.driver import options
            getattr(options, "pd", None)
        try:
            await self._call(warm)
        except Exception as e:  # noqa: BLE001 - the write path retries with backoff
            log.warning("ClickHouse not reachable at start (%s); inserts will retry", _short(e))
        else:
            log.info("results store ready: %s", self.s.clickhouse_dsn_redacted)

    @property
    def opened(self) -> bool:
        """Connected and migrated at least once (a sink process's readiness)."""
        return self.store is not None

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def write(self, table: str, rows: list | dict | Blocks, source: str) -> None:
        """Insert ``rows`` identified by ``source`` (topic, partition and offset range);
        returns once they are stored or dead-lettered. ``rows`` is a list of rows (lists in
        the table's column order), Native blocks of a columnar table (:class:`Blocks`, as they
        came from the topic), or a dict of columns (``ts`` in epoch milliseconds) made into
        one here, its rows the table cannot hold handed to ``on_rejected``."""
        if isinstance(rows, dict):
            rows = await self.blocks(table, rows)
        n = rowblock.n_rows(rows) if isinstance(rows, Blocks) else len(rows)
        if not n:
            return
        self.pending = n
        delay = 0.2
        token = f"{table}|{source}"
        while True:
            try:
                t0 = time.perf_counter()
                await self._call(self._insert, table, rows, token)
                if self.on_batch is not None:
                    self.on_batch(time.perf_counter() - t0)
                if self.down:
                    self.down = False
                    log.info("ClickHouse inserts succeed again")
                break
            except Exception as e:  # noqa: BLE001 - classified below
                if _is_bad_data(e):
                    if isinstance(rows, Blocks):
                        rows = column_rows(table, rowblock.decode(b"".join(rows)))
                    await self._row_by_row(table, rows, token)
                    break
                self.retries += 1
                self.down = True
                log.warning("ClickHouse insert into %s failed (%s); retrying in %.1fs with the "
                            "same deduplication token", table, _short(e), delay)
                self.store = None if not self.s.clickhouse_dsn.startswith("chdb") else \
                    self.store
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.pending = 0

    async def blocks(self, table: str, cols: dict) -> Blocks:
        """The rows of ``cols`` that ``table`` can hold as one Native block; the others go to
        ``on_rejected`` with the reason."""
        if not len(cols.get("account", ())):
            return Blocks()
        cols, rejected = rowblock.valid(table, cols)
        for row, why in rejected:
            if self.on_rejected:
                await self.on_rejected(table, row, why)
        return Blocks([rowblock.block(table, cols)] if len(cols["account"]) else [])

    async def write_messages(self, values, source: str) -> None:
        """Store a batch of internal ``risk-snapshots`` messages: one insert per table, of
        the batch's Native blocks joined as they are. JSON messages (stress rows; columns in
        the framing of earlier versions) are parsed and added."""
        blocks: dict[str, Blocks] = {}
        legacy = []
        for v in values:
            if rowblock.is_native(v):
                table, blk = rowblock.split(v)
                blocks.setdefault(table, Blocks()).append(blk)
            else:
                legacy.append(orjson.loads(v))
        for table, rows in snapshot_columns(legacy).items():
            if isinstance(rows, dict):
                blocks.setdefault(table, Blocks()).extend(await self.blocks(table, rows))
            else:
                await self.write(table, rows, source)
        for table, blks in blocks.items():
            await self.write(table, blks, source)

    def _insert(self, table, rows, token) -> None:
        drill = self.s.fault_clickhouse_down_file
        if drill is not None and drill.exists():
            from clickhouse_connect.driver.exceptions import OperationalError
            raise OperationalError(f"ClickHouse unreachable (fault drill: {drill} exists)")
        st = self._ensure()
        cols = COLUMNS[table]
        if isinstance(rows, Blocks):
            # text goes as String into LowCardinality(String) columns: the conversion is on by
            # default, asked for anyway in case a server's profile turned it off
            st.client.raw_insert(f"{st.db}.{table}", cols, b"".join(rows), fmt="Native",
                                 settings={"insert_deduplication_token": token,
                                           "input_format_native_allow_types_conversion": 1})
            self.inserted[table] += rowblock.n_rows(rows)
            return
        st.client.insert(f"{st.db}.{table}", rows, column_names=cols,
                         settings={"insert_deduplication_token": token})
        self.inserted[table] += len(rows)

    async def _row_by_row(self, table, rows, token) -> None:
        for i, row in enumerate(rows):
            try:
                await self._call(self._insert, table, [row], f"{token}#{i}")
            except Exception as e:  # noqa: BLE001
                if not _is_bad_data(e):
                    raise
                if self.on_rejected:
                    await self.on_rejected(table, row, _short(e))

    async def run_query(self, sql: str, parameters=None):
        """Read-only query on the sink's client (the worker's SQL endpoint)."""
        def q():
            return self._ensure().query(sql, parameters, readonly=True)
        return await self._call(q)


COLUMNS = {"risk_snapshots": SNAPSHOT_COLS, "margin_events": EVENT_COLS,
           "exposures": EXPOSURE_COLS, "stress": STRESS_COLS,
           "scenario_pnl": SCENARIO_PNL_COLS}


def snapshot_columns(msgs) -> dict[str, dict | list]:
    """Merge parsed JSON snapshot messages into one dict of columns per columnar table (the
    framing of earlier versions) and one row list for stress."""
    out: dict = {}
    for msg in msgs:
        for table, data in msg.items():
            if isinstance(data, dict):
                cols = out.setdefault(table, {c: [] for c in COLUMNS[table]})
                for c in cols:
                    cols[c].extend(data[c])
            else:
                cols = COLUMNS[table]
                out.setdefault(table, []).extend(
                    [rowblock.cell(c, r[i]) for i, c in enumerate(cols)] for r in data)
    return out


def _event_row(e: dict) -> list:
    d = dict(e)
    d["worst_underlying"] = d.get("worst_underlying") or ""
    d["liquidation_plan"] = json.dumps(d["liquidation_plan"])
    return [d[c] for c in EVENT_COLS]


def dedup_token(table: str, rows) -> str:
    """Deterministic token of a batch: same rows (by identity columns) -> same token."""
    h = hashlib.sha256(table.encode())
    for r in rows:
        h.update(repr(r).encode())
    return h.hexdigest()


# ClickHouse server error codes that mean "this data is wrong" (retrying cannot help):
# CANNOT_PARSE_*, TYPE_MISMATCH, ILLEGAL_*, ARGUMENT_OUT_OF_BOUND, TOO_LARGE_STRING_SIZE, ...
_BAD_DATA_CODES = {6, 26, 27, 32, 38, 41, 53, 69, 70, 72, 117, 131, 190, 246, 321, 349}


def _is_bad_data(e: Exception) -> bool:
    """True for errors caused by the rows themselves (dead-letter them), False for transient
    ones (connection, server busy, timeouts: retry with backoff)."""
    import re
    import struct
    from clickhouse_connect.driver.exceptions import DataError, OperationalError
    if isinstance(e, OperationalError):
        return False
    if isinstance(e, (DataError, ValueError, TypeError, OverflowError, struct.error)):
        return True
    code = getattr(e, "code", None)
    if code is None:
        m = re.search(r"Code: (\d+)", str(e))
        code = int(m.group(1)) if m else None
    return code in _BAD_DATA_CODES


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:300] if str(e) else type(e).__name__


def make_sink(settings: Settings, on_rejected=None) -> ClickHouseSink:
    return ClickHouseSink(settings, on_rejected=on_rejected)


def event_row(e: dict) -> list:
    return _event_row(e)
