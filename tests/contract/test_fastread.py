"""The readers compiled from the schemas against fastavro: the same record from the same bytes,
and never a record where fastavro finds none."""
import io
import struct

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas as S
from schemas.codec import MAGIC, load_schemas
from schemas.fastread import compile_reader

CURRENT = load_schemas(millis=True)
COVERED = [n for n, s in CURRENT.items() if compile_reader(s) is not None]


def _value(t):
    if isinstance(t, list):
        return st.one_of(*[_value(x) for x in t])
    if isinstance(t, dict):
        if t.get("type") == "enum":
            return st.sampled_from(t["symbols"])
        return _value(t["type"])
    return {"string": st.text(max_size=200), "null": st.none(), "boolean": st.booleans(),
            "double": st.floats(allow_nan=True, allow_infinity=True),
            "float": st.floats(width=32), "long": st.integers(-2 ** 63, 2 ** 63 - 1),
            "int": st.integers(-2 ** 31, 2 ** 31 - 1)}[t]


def _records(name):
    return st.fixed_dictionaries({f["name"]: _value(f["type"])
                                  for f in CURRENT[name]["fields"]})


def _same(a, b):
    """Equal records, NaN equal to NaN and -0.0 told from 0.0 (compared as their bits)."""
    def canon(v):
        return struct.pack("<d", v) if isinstance(v, float) else v
    return {k: canon(v) for k, v in a.items()} == {k: canon(v) for k, v in b.items()}


def _fastavro(name, body):
    bio = io.BytesIO(body)
    rec = fastavro.schemaless_reader(bio, CURRENT[name], None)
    if bio.tell() != len(body):
        raise ValueError("trailing bytes")
    return rec


def _body(name, rec):
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, CURRENT[name], rec)
    return buf.getvalue()


def test_the_worker_records_are_covered_and_nested_ones_are_not():
    # the per-event records must take the compiled path; records with arrays stay on fastavro
    assert {"Trade", "CollateralChange", "Quote", "Instrument", "RiskParams"} <= set(COVERED)
    assert compile_reader(CURRENT["MarginEvent"]) is None
    assert compile_reader({"type": "record", "name": "X",
                           "fields": [{"name": "a", "type": ["null", "string", "long"]}]}) is None


@pytest.mark.parametrize("name", COVERED)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_same_record_as_fastavro(name, data):
    rec = data.draw(_records(name))
    body = _body(name, rec)
    got, end = compile_reader(CURRENT[name])(body, 0)
    assert end == len(body)
    assert list(got) == [f["name"] for f in CURRENT[name]["fields"]]  # field order kept
    assert _same(got, _fastavro(name, body))


@pytest.mark.parametrize("name", COVERED)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_bodies_never_read_where_fastavro_fails(name, data):
    """Truncated, extended and bit-flipped bodies: whenever the compiled reader accepts one
    (ending exactly at its end), fastavro accepts it too and reads the same record."""
    body = bytearray(_body(name, data.draw(_records(name))))
    how = data.draw(st.sampled_from(["cut", "flip", "extend"]))
    if how == "cut":
        body = body[:data.draw(st.integers(0, max(0, len(body) - 1)))]
    elif how == "flip" and body:
        for _ in range(data.draw(st.integers(1, 4))):
            j = data.draw(st.integers(0, len(body) - 1))
            body[j] ^= 1 << data.draw(st.integers(0, 7))
    else:
        body += data.draw(st.binary(min_size=1, max_size=12))
    body = bytes(body)
    try:
        got, end = compile_reader(CURRENT[name])(body, 0)
    except Exception:  # noqa: BLE001 - a refusal is always allowed: fastavro then decides
        return
    if end != len(body):
        return
    assert _same(got, _fastavro(name, body))


def test_codec_errors_are_fastavros():
    """The codec reports the same typed error, with the same reason, on either path."""
    codec = S.Codec()
    slow = S.Codec()
    slow._fast = {}
    good = codec.encode("Trade", dict(trade_id="t1", account="a", instrument="BTC-PERP",
                                      quantity=1.0, price=1.0, fee=0.0, ts=0))
    out_of_domain = S.Codec(validate_domain=False).encode(
        "Trade", dict(trade_id="t1", account="a", instrument="BTC-PERP", quantity=1.0,
                      price=float("nan"), fee=0.0, ts=0))
    bad = [good[:-3], good + b"\x00", good[:10] + b"\x7f" + good[11:],
           good[:10] + b"\x03" + good[11:],  # truncated, trailing, negative/odd lengths
           out_of_domain]  # read whole, then refused by its domain check
    for data in bad:
        errors = []
        for c in (codec, slow):
            with pytest.raises(S.SchemaError) as e:
                c.decode(data, millis=True)
            errors.append((type(e.value), str(e.value)))
        assert errors[0] == errors[1]
    assert good[:2] == MAGIC
    assert codec.decode(good, millis=True) == slow.decode(good, millis=True) == (
        "Trade", dict(trade_id="t1", account="a", instrument="BTC-PERP", quantity=1.0,
                      price=1.0, fee=0.0, ts=0))
