"""Avro codec on fastavro.

Default framing is Avro *single-object encoding* (``C3 01`` + 8-byte little-endian CRC-64-AVRO
fingerprint of the schema's parsing canonical form + binary body): self-describing, no registry
needed. When a Schema Registry URL is configured, :class:`ConfluentCodec` uses the Confluent wire
format (``00`` + 4-byte big-endian schema id + body) through confluent-kafka's registry client.

Decoding validates the domain of every field (finite numbers, positive prices, ...), so bad data
is rejected here with a typed error rather than discovered later as a NaN margin.
"""
from __future__ import annotations

import io
import json
import math
import re
import struct
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import fastavro
from fastavro.schema import to_parsing_canonical_form

from .errors import (CorruptPayload, MissingField, OutOfDomain, UnknownFingerprint,
                     WrongRecordType)
from .fastread import compile_reader

HERE = Path(__file__).resolve().parent
RECORDS = ("Trade", "Quote", "CollateralChange", "Instrument", "RiskParams", "MarginEvent",
           "DeadLetter")
MAGIC = b"\xc3\x01"
MAX_ABS_QUANTITY = 1e9

_EMPTY64 = 0xC15D213AA4D7A795


def _crc_table():
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY64 & -(fp & 1))
        table.append(fp)
    return table


_TABLE = _crc_table()


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO (Rabin) fingerprint, as defined by the Avro specification."""
    fp = _EMPTY64
    for b in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ b) & 0xFF]
    return fp


def load_schema(name: str, directory: Path | None = None) -> dict:
    path = (directory or HERE) / f"{name}.avsc"
    return json.loads(path.read_text())


@lru_cache(maxsize=None)
def load_schemas(version_dir: str | None = None, millis: bool = False) -> dict[str, dict]:
    """Parsed schemas by record name (current, or a ``history/vN`` directory).

    ``millis``: the same schemas with ``timestamp-millis`` read as the plain long it is on the
    wire (epoch milliseconds) instead of a ``datetime`` (see :meth:`Codec.decode`)."""
    d = HERE if version_dir is None else HERE / "history" / version_dir
    named: dict = {}
    out = {}
    # MarginEvent reuses no types from others, so each file parses on its own
    for name in RECORDS:
        schema = load_schema(name, d)
        out[name] = fastavro.parse_schema(_plain_millis(schema) if millis else schema,
                                          named_schemas=named)
    return out


def _plain_millis(schema):
    """``schema`` with every ``timestamp-millis`` type replaced by its underlying long (the
    parsing canonical form, hence the fingerprint, is unchanged: it omits logical types)."""
    if isinstance(schema, list):
        return [_plain_millis(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get("logicalType") == "timestamp-millis" and schema.get("type") == "long":
        return "long"
    out = dict(schema)
    if "fields" in out:
        out["fields"] = [{**f, "type": _plain_millis(f["type"])} for f in out["fields"]]
    for key in ("items", "values"):
        if key in out:
            out[key] = _plain_millis(out[key])
    if isinstance(out.get("type"), (dict, list)):
        out["type"] = _plain_millis(out["type"])
    return out


def _canonical_fp(parsed) -> bytes:
    return struct.pack("<Q", crc64_avro(to_parsing_canonical_form(parsed).encode()))


# -- domain validation --------------------------------------------------------------------------

def _finite(rec, name, field, *, positive=False, nonzero=False, max_abs=None, nullable=False):
    v = rec.get(field)
    if v is None:
        if nullable:
            return
        raise MissingField(f"{name}.{field} is required", record=name, field=field)
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        raise OutOfDomain(f"{name}.{field} must be a finite number, got {v!r}", record=name,
                          field=field, value=v)
    if positive and v <= 0:
        raise OutOfDomain(f"{name}.{field} must be > 0, got {v!r}", record=name, field=field,
                          value=v)
    if nonzero and v == 0:
        raise OutOfDomain(f"{name}.{field} must be non-zero", record=name, field=field, value=v)
    if max_abs is not None and abs(v) > max_abs:
        raise OutOfDomain(f"{name}.{field}={v!r} exceeds {max_abs:g} in absolute value",
                          record=name, field=field, value=v)


def _nonempty(rec, name, field):
    v = rec.get(field)
    if not isinstance(v, str) or not v:
        raise OutOfDomain(f"{name}.{field} must be a non-empty string, got {v!r}", record=name,
                          field=field, value=v)


_INF = float("inf")
_OBJECT_REPR = re.compile(r" (?:from|in) <[\w.]+ object at 0x[0-9a-fA-F]+>")


def _plausible(name: str, rec: dict) -> bool:
    """True when a decoded Trade or CollateralChange is certainly within its domain: one
    expression per record for the worker's hot path (types are guaranteed by the Avro
    schema). False means "check in full", which names the offending field: NaN fails every
    comparison, so it never passes here."""
    try:
        if name == "Trade":
            q, p, f = rec["quantity"], rec["price"], rec["fee"]
            return bool(rec["trade_id"] and rec["account"] and rec["instrument"]
                        and 0 < abs(q) <= MAX_ABS_QUANTITY and 0 < p < _INF
                        and -_INF < f < _INF)
        if name == "CollateralChange":
            return bool(rec["change_id"] and rec["account"] and rec["asset"]
                        and abs(rec["amount"]) <= MAX_ABS_QUANTITY)
    except (KeyError, TypeError):
        return False
    return False


def validate(name: str, rec: dict) -> dict:
    """Check the documented domain of a decoded (or about-to-be-encoded) record."""
    if _plausible(name, rec):
        return rec
    if name == "Trade":
        for f in ("trade_id", "account", "instrument"):
            _nonempty(rec, name, f)
        _finite(rec, name, "quantity", nonzero=True, max_abs=MAX_ABS_QUANTITY)
        _finite(rec, name, "price", positive=True)
        _finite(rec, name, "fee")
    elif name == "Quote":
        _nonempty(rec, name, "instrument")
        _finite(rec, name, "mark", positive=True)
        _finite(rec, name, "index_price", positive=True)
        _finite(rec, name, "bid", positive=True, nullable=True)
        _finite(rec, name, "ask", positive=True, nullable=True)
        _finite(rec, name, "mark_iv", positive=True, max_abs=10.0, nullable=True)
    elif name == "CollateralChange":
        for f in ("change_id", "account", "asset"):
            _nonempty(rec, name, f)
        _finite(rec, name, "amount", max_abs=MAX_ABS_QUANTITY)
    elif name == "Instrument":
        _nonempty(rec, name, "id")
        _finite(rec, name, "multiplier", positive=True)
        _finite(rec, name, "lot_size")
        if rec.get("kind") in ("CALL", "PUT"):
            _finite(rec, name, "strike", positive=True)
            if rec.get("expiry") is None:
                raise MissingField(f"{name}.expiry is required for options", record=name,
                                   field="expiry")
        if rec.get("kind") != "SPOT" and not rec.get("underlying"):
            raise MissingField(f"{name}.underlying is required for derivatives", record=name,
                               field="underlying")
    elif name == "RiskParams":
        _nonempty(rec, name, "underlying")
        for f in ("scan_range", "concentration_liquidity", "mm_ratio", "dte_floor_days"):
            _finite(rec, name, f, positive=True)
        for f in ("vol_shock_base", "vol_shock_power", "short_option_min", "concentration_rate",
                  "basis_rate", "rate"):
            _finite(rec, name, f)
        _finite(rec, name, "haircut", nullable=True)
    return rec


# -- codecs -------------------------------------------------------------------------------------

class Codec:
    """Single-object-encoding codec for every riskpipe record.

    Knows the current schemas and all released versions in ``schemas/history`` so that records
    written by an older producer decode into the current shape (Avro schema resolution).
    """

    def __init__(self, validate_domain: bool = True):
        self.validate_domain = validate_domain
        self.current = load_schemas()
        self.current_millis = load_schemas(millis=True)
        self._fp = {name: _canonical_fp(s) for name, s in self.current.items()}
        self._writers: dict[bytes, tuple[str, dict]] = {fp: (n, self.current[n])
                                                        for n, fp in self._fp.items()}
        self._writers_millis = {fp: (n, self.current_millis[n]) for n, fp in self._fp.items()}
        # straight-line readers of current-version records, timestamps as millis (the
        # worker's per-event path), by the whole 10-byte header, with the record name; a schema
        # the generator does not cover (see fastread) has none
        readers = {n: compile_reader(self.current_millis[n]) for n in self._fp}
        self._fast = {MAGIC + fp: (n, readers[n]) for n, fp in self._fp.items()
                      if readers[n] is not None}
        hist = HERE / "history"
        if hist.is_dir():
            for vdir in sorted(p.name for p in hist.iterdir() if p.is_dir()):
                plain = load_schemas(vdir, millis=True)
                for n, s in load_schemas(vdir).items():
                    fp = _canonical_fp(s)
                    self._writers.setdefault(fp, (n, s))
                    self._writers_millis.setdefault(fp, (n, plain[n]))

    def fingerprint(self, name: str) -> bytes:
        return self._fp[name]

    def encode(self, name: str, record: dict) -> bytes:
        if self.validate_domain:
            validate(name, record)
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(self._fp[name])
        try:
            fastavro.schemaless_writer(buf, self.current[name], record)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            missing = [f["name"] for f in self.current[name]["fields"]
                       if f["name"] not in record and "default" not in f]
            if missing:
                raise MissingField(f"{name}: missing field(s) {missing}", record=name,
                                   field=missing[0]) from e
            raise OutOfDomain(f"{name}: {e}", record=name) from e
        return buf.getvalue()

    def decode(self, data: bytes, expect: str | None = None,
               millis: bool = False) -> tuple[str, dict]:
        """Decode one framed record; returns (record name, record).

        ``millis``: timestamps come back as epoch milliseconds (``int``, the value on the
        wire) rather than ``datetime``. For a caller that needs the number anyway, such as the
        worker's account path: building the ``datetime`` and converting it back took ~40% of
        the decoding time."""
        if millis and data.__class__ is bytes:
            # the worker's per-event path: a current-version record its reader accepts
            # whole needs none of the framing checks below (each would pass); a record it
            # refuses goes the full way, where fastavro names the error (0.3 us a record less
            # than the checks first: 2.6 -> 2.3 us for the bench's trades)
            hit = self._fast.get(data[:10])
            if hit is not None and (expect is None or expect == hit[0]):
                try:
                    rec, end = hit[1](data, 10)
                except Exception:  # noqa: BLE001 - re-read below, by fastavro
                    end = -1
                if end == len(data):
                    if self.validate_domain:
                        validate(hit[0], rec)
                    return hit[0], rec
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 10:
            raise CorruptPayload(f"payload of {0 if data is None else len(data)} bytes is too "
                                 "short for single-object encoding")
        data = bytes(data)
        if data[:2] != MAGIC:
            raise CorruptPayload(f"bad magic bytes {data[:2].hex()} (expected c301)")
        fp = data[2:10]
        try:
            name, writer = (self._writers_millis if millis else self._writers)[fp]
        except KeyError:
            raise UnknownFingerprint(f"unknown schema fingerprint {fp[::-1].hex()}",
                                     value=fp.hex()) from None
        if expect is not None and name != expect:
            raise WrongRecordType(f"expected {expect}, got {name}", record=name)
        rec = self._read(name, writer, data[10:],
                         (self.current_millis if millis else self.current)[name])
        if self.validate_domain:
            validate(name, rec)
        return name, rec

    def _read(self, name, writer, body: bytes, reader) -> dict:
        bio = io.BytesIO(body)
        try:
            # a record of the current version needs no resolution (reader None: no
            # comparison of the two schemas per record)
            rec = fastavro.schemaless_reader(bio, writer, None if writer is reader else reader)
        except Exception as e:  # fastavro raises EOFError, ValueError, UnicodeDecodeError...
            # its messages may name the buffer object ("from <_io.BytesIO object at 0x...>"):
            # dropped, so a replay dead-letters the record with the same reason
            reason = _OBJECT_REPR.sub("", str(e))
            raise CorruptPayload(f"{name}: body does not decode ({type(e).__name__}: "
                                 f"{reason})", record=name) from None
        if bio.tell() != len(body):
            raise CorruptPayload(f"{name}: {len(body) - bio.tell()} trailing bytes after the "
                                 "record", record=name)
        return rec


def _registry_schema(schema_str: str):
    try:
        from confluent_kafka.schema_registry import Schema
    except ImportError:  # extras not installed: the injected client takes a plain object
        from types import SimpleNamespace
        return SimpleNamespace(schema_str=schema_str, schema_type="AVRO")
    return Schema(schema_str, "AVRO")


class ConfluentCodec(Codec):
    """Confluent wire format (magic 0, 4-byte schema id) with confluent-kafka's Schema Registry
    client; schemas are registered under ``<record>-value`` subjects on first use.

    The registry client needs confluent-kafka's ``schemaregistry`` extra
    (``pip install 'confluent-kafka[schemaregistry]==2.16.1'``), which is not installed by
    default: the default framing (single-object encoding) needs no registry."""

    def __init__(self, registry_url: str, validate_domain: bool = True, client=None):
        super().__init__(validate_domain)
        if client is None:
            from confluent_kafka.schema_registry import SchemaRegistryClient
            client = SchemaRegistryClient({"url": registry_url})
        self.client = client
        self._ids: dict[str, int] = {}
        self._by_id: dict[int, tuple[str, dict]] = {}

    def schema_id(self, name: str, subject: str | None = None) -> int:
        if name not in self._ids:
            sid = self.client.register_schema(subject or f"{name}-value",
                                              _registry_schema(json.dumps(load_schema(name))))
            self._ids[name] = sid
            self._by_id[sid] = (name, self.current[name])
        return self._ids[name]

    def encode(self, name: str, record: dict) -> bytes:
        framed = super().encode(name, record)
        return b"\x00" + struct.pack(">I", self.schema_id(name)) + framed[10:]

    def decode(self, data: bytes, expect: str | None = None,
               millis: bool = False) -> tuple[str, dict]:
        if not isinstance(data, (bytes, bytearray)) or len(data) < 5 or data[0] != 0:
            raise CorruptPayload("not Confluent wire format (magic byte 0 + 4-byte schema id)")
        sid = struct.unpack(">I", data[1:5])[0]
        if sid not in self._by_id:
            try:
                s = self.client.get_schema(sid)
            except Exception as e:
                raise UnknownFingerprint(f"unknown schema id {sid}: {e}", value=sid) from None
            parsed = fastavro.parse_schema(json.loads(s.schema_str))
            name = parsed["name"].rsplit(".", 1)[-1]
            self._by_id[sid] = (name, parsed)
        name, writer = self._by_id[sid]
        if expect is not None and name != expect:
            raise WrongRecordType(f"expected {expect}, got {name}", record=name)
        rec = self._read(name, writer, bytes(data[5:]), self.current[name])
        if millis:
            rec = {k: _epoch_ms(v) if isinstance(v, datetime) else v for k, v in rec.items()}
        if self.validate_domain:
            validate(name, rec)
        return name, rec


def _epoch_ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)
