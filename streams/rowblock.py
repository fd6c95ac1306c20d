"""Rows for the columnar ClickHouse tables (risk snapshots, exposures, scenario P&L) as
ClickHouse ``Native`` blocks: how they travel on the internal ``risk-snapshots`` topic and how
the sink inserts them.

Why: a market tick over 20,000 accounts writes some 2,000 snapshot and 4,000 exposure rows, ten
times a second. As JSON, the worker formatted every float as text, the sink parsed it, merged
the columns and wrote JSON again, and ClickHouse parsed that text once more. A Native block is
the table's own columnar layout: numbers are the numpy arrays' bytes as they are (exact, no
decimal round trip), the sink joins the blocks of a batch into one insert without looking
inside, and ClickHouse reads them without parsing text.

Message framing: the byte ``NATIVE`` (1), the table's name (one length byte, ASCII), then one
block exactly as ClickHouse writes ``FORMAT Native`` over HTTP: the number of columns and of
rows (varints), then per column its name, its type and its values. Blocks concatenate: a run of
them is a valid ``Native`` stream of one insert. Text goes as ``String``, which ClickHouse
converts to the tables' ``LowCardinality(String)`` on insert. A message that starts with ``{``
is the JSON framing of earlier versions (:func:`read` still reads it).

Rows a table cannot hold faithfully (a non-finite figure, an integer out of its column's range)
are found before encoding (:func:`invalid_rows`) and dead-lettered by the caller with the
reason: inside a block ClickHouse would store a NaN without complaint.
"""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import orjson

NATIVE = 1

_TS = "DateTime64(3, 'UTC')"  # epoch milliseconds as Int64
# column -> (ClickHouse type in the block, numpy dtype of its values; None for text)
_KINDS = {
    "String": None, _TS: "<i8", "Float64": "<f8", "Int16": "<i2", "UInt16": "<u2",
    "UInt64": "<u8",
}
TYPES: dict[str, list[tuple[str, str]]] = {
    "risk_snapshots": [
        ("account", "String"), ("ts", _TS), ("state", "String"), ("equity", "Float64"),
        ("im", "Float64"), ("mm", "Float64"), ("margin_ratio", "Float64"),
        ("shortfall", "Float64"), ("worst_underlying", "String"), ("worst_scenario", "Int16"),
        ("worst_pnl", "Float64"), ("trigger", "String"), ("params_version", "UInt64"),
        ("seq", "UInt64")],
    "exposures": [
        ("account", "String"), ("underlying", "String"), ("ts", _TS), ("delta", "Float64"),
        ("gamma", "Float64"), ("vega", "Float64"), ("theta", "Float64")],
    "scenario_pnl": [
        ("account", "String"), ("underlying", "String"), ("scenario", "UInt16"), ("ts", _TS),
        ("pnl", "Float64")],
}
COLUMNS = {t: [c for c, _ in cols] for t, cols in TYPES.items()}
_RANGES = {"Int16": (-2**15, 2**15 - 1), "UInt16": (0, 2**16 - 1), "UInt64": (0, 2**64 - 1),
           _TS: (-2**63, 2**63 - 1)}


def invalid_rows(table: str, cols: dict) -> dict[int, str]:
    """Row index -> reason, for values ``table`` cannot hold faithfully (vectorised): a
    non-finite or missing figure, a fractional or out-of-range integer."""
    bad: dict[int, str] = {}
    for c, typ in TYPES[table]:
        if typ == "String":
            continue
        a = np.asarray(cols[c], dtype=float)  # None -> nan
        if typ in _RANGES:
            lo, hi = _RANGES[typ]
            ok = (a >= lo) & (a <= hi) & (a == np.floor(a))
            what = f"outside {c}'s range [{lo}, {hi}]"
        else:
            ok = np.isfinite(a)
            what = f"non-finite {c}"
        if ok.all():
            continue
        for k in np.flatnonzero(~ok).tolist():
            bad.setdefault(k, f"{what}: {cols[c][k]!r}")
    return bad


class Blocks(list):
    """Native blocks (bytes) of one table: a batch the sink inserts as one ``Native`` stream."""


def encode(table: str, cols: dict, chunk: int = 2000
           ) -> tuple[list[tuple[bytes, bytes]], list[tuple[list, str]]]:
    """The internal messages of the rows of ``cols`` that ``table`` can hold
    (:func:`messages`), and (row, reason) of the others, for the dead-letter topic."""
    if not len(cols.get("account", ())):
        return [], []
    cols, rejected = valid(table, cols)
    return messages(table, cols, chunk), rejected


def valid(table: str, cols: dict) -> tuple[dict, list[tuple[list, str]]]:
    """``cols`` without the rows ``table`` cannot hold (:func:`invalid_rows`), and (row,
    reason) of those."""
    bad = invalid_rows(table, cols)
    if not bad:
        return cols, []
    ks = sorted(bad)
    rejected = list(zip(column_rows(table, cols, ks), (bad[k] for k in ks)))
    return without_rows(cols, bad), rejected


def without_rows(cols: dict, drop) -> dict:
    """``cols`` without the rows at the indexes ``drop``."""
    n = len(cols.get("account", ()))
    keep = np.setdiff1d(np.arange(n), np.fromiter(drop, dtype=np.int64))
    return {c: [v[k] for k in keep.tolist()] if isinstance(v, list) else np.asarray(v)[keep]
            for c, v in cols.items()}


def column_rows(table: str, cols: dict, idx=None) -> list[list]:
    """Rows (``table``'s column order, ``ts`` as datetimes) of a dict of columns: all of
    them, or those at the indexes ``idx``."""
    names = COLUMNS[table]
    if idx is None:
        idx = range(len(cols.get("account", ())))
    return [[cell(c, cols[c][k]) for c in names] for k in idx]


def cell(col, v):
    """A column's value as ClickHouse's Python client and JSON take it: plain Python numbers,
    ``ts`` (epoch milliseconds) as an aware datetime."""
    if isinstance(v, np.generic):
        v = v.item()
    if col == "ts" and isinstance(v, (int, float)):
        return datetime.fromtimestamp(v / 1000, tz=timezone.utc)
    return v


def messages(table: str, cols: dict, chunk: int = 2000) -> list[tuple[bytes, bytes]]:
    """(key, value) of the internal messages carrying the valid rows of ``cols`` (name ->
    list of text or numpy array of numbers, ``ts`` in epoch milliseconds) in blocks of at most
    ``chunk`` rows, keyed by their first account. The caller checks :func:`invalid_rows`
    first: values are converted to their column's type here as they are."""
    n = len(cols.get("account", ()))
    head = bytes([NATIVE, len(table)]) + table.encode()
    return [(cols["account"][lo].encode(), head + block(table, cols, lo, min(n, lo + chunk)))
            for lo in range(0, n, chunk)]


def block(table: str, cols: dict, lo: int = 0, hi: int | None = None) -> bytes:
    """Rows ``lo:hi`` of ``cols`` as one Native block of ``table``'s columns."""
    hi = len(cols["account"]) if hi is None else hi
    parts = [_varint(len(TYPES[table])), _varint(hi - lo)]
    for c, head, dtype in _HEADS[table]:
        parts.append(head)
        if dtype is None:
            parts.append(_strings(cols[c][lo:hi]))
        else:
            parts.append(np.asarray(cols[c][lo:hi]).astype(dtype, copy=False).tobytes())
    return b"".join(parts)


def _heads(table: str) -> list[tuple[str, bytes, str | None]]:
    return [(c, _text(c) + _text(typ), _KINDS[typ]) for c, typ in TYPES[table]]


def split(value: bytes) -> tuple[str, bytes]:
    """(table, block) of a Native message."""
    n = value[1]
    return value[2:2 + n].decode(), value[2 + n:]


def is_native(value: bytes) -> bool:
    return value[:1] == b"\x01"


def read(value: bytes) -> dict[str, dict | list]:
    """Tables of one internal message, either framing: ``{table: {column: values}}`` (text as
    str, numbers as numpy arrays or lists, ``ts`` in epoch milliseconds), or a list of rows
    for the JSON framing's stress rows."""
    if is_native(value):
        table, blk = split(value)
        return {table: decode(blk)}
    return orjson.loads(value)


def n_rows(blocks: list[bytes]) -> int:
    """Rows in a list of blocks (each block's header only)."""
    total = 0
    for b in blocks:
        _, pos = _read_varint(b, 0)
        rows, _ = _read_varint(b, pos)
        total += rows
    return total


def decode(data: bytes) -> dict[str, list | np.ndarray]:
    """Columns of one or more concatenated blocks (the sink's row-by-row fallback, tests and
    the bench's reader)."""
    out: dict[str, list] = {}
    pos, mv = 0, memoryview(data)
    while pos < len(data):
        ncols, pos = _read_varint(data, pos)
        nrows, pos = _read_varint(data, pos)
        for _ in range(ncols):
            name, pos = _read_text(data, pos)
            typ, pos = _read_text(data, pos)
            if typ not in _KINDS:
                raise ValueError(f"unsupported column type {typ!r} in a Native block")
            dtype = _KINDS[typ]
            if dtype is None:
                vals = []
                for _ in range(nrows):
                    v, pos = _read_text(data, pos)
                    vals.append(v)
            else:
                size = np.dtype(dtype).itemsize * nrows
                vals = np.frombuffer(mv[pos:pos + size], dtype=dtype).copy()
                pos += size
            out.setdefault(name, []).append(vals)
    return {c: _join(parts) for c, parts in out.items()}


def _join(parts: list):
    if isinstance(parts[0], list):
        return [v for p in parts for v in p]
    return np.concatenate(parts)


def _strings(vals) -> bytes:
    """Values of a ``String`` column: each one's UTF-8 length (varint) and bytes.

    Short ASCII text (account names, states, underlyings) is laid out in one pass: joined
    with a NUL before each value, every NUL is where a length byte goes, and the gaps between
    them are the lengths. A Python call per value (``len``) cost about as much as the rest of
    a 100,000-account tick's encoding."""
    vals = vals if isinstance(vals, list) else list(vals)
    if not vals:
        return b""
    if len(vals) <= _SMALL:
        return _strings_small(vals)
    joined = "\x00" + "\x00".join(vals)
    if joined.isascii():
        buf = np.frombuffer(joined.encode(), dtype=np.uint8).copy()
        at = np.flatnonzero(buf == 0)
        if at.size == len(vals):  # no NUL inside a value
            lens = np.diff(at, append=buf.size) - 1
            if lens.max() < 0x80:  # one-byte varints
                buf[at] = lens
                return buf.tobytes()
    return b"".join(_text(v) for v in vals)


# below this many values a loop beats the numpy pass: its half-dozen array calls cost ~7 us
# whatever the size, the loop ~0.07 us a value (account names, measured). A unit of work of the
# account path holds a few to a hundred rows; a market tick's steps, thousands.
_SMALL = 128


def _strings_small(vals: list) -> bytes:
    out = bytearray()
    for v in vals:
        b = v.encode()
        n = len(b)
        if n < 0x80:
            out.append(n)
        else:
            out += _varint(n)
        out += b
    return bytes(out)


def _text(v: str) -> bytes:
    b = v.encode()
    return _varint(len(b)) + b


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, pos
        shift += 7


def _read_text(data: bytes, pos: int) -> tuple[str, int]:
    n, pos = _read_varint(data, pos)
    return data[pos:pos + n].decode(), pos + n


_HEADS = {t: _heads(t) for t in TYPES}  # each column's name and type, encoded once
