"""Single-object encoding, CRC-64-AVRO, typed errors for bad payloads."""
import struct
from datetime import datetime, timezone

import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form

import schemas as S

TS = datetime(2026, 1, 1, tzinfo=timezone.utc)
GOOD = {
    "Trade": dict(trade_id="t1", account="acct-1", instrument="BTC-PERP", quantity=-1.5,
                  price=60_000.25, fee=1.2, ts=TS),
    "Quote": dict(instrument="BTC-60000-C", mark=0.05, bid=0.049, ask=0.051,
                  index_price=60_000.0, mark_iv=0.55, ts=TS),
    "CollateralChange": dict(change_id="c1", account="acct-1", asset="BTC", amount=0.5,
                             kind="DEPOSIT", ts=TS),
    "Instrument": dict(id="BTC-60000-C", kind="CALL", underlying="BTC", settlement="INVERSE",
                       multiplier=1.0, strike=60_000.0, expiry=TS, lot_size=0.1, ts=TS),
    "RiskParams": dict(underlying="BTC", version=3, scan_range=0.16, grid="deribit",
                       vol_shock_base=0.38, vol_shock_power=0.3, dte_floor_days=3.0,
                       short_option_min=0.01, concentration_rate=0.02,
                       concentration_liquidity=5e6, basis_rate=0.01, mm_ratio=0.75, rate=0.0,
                       haircut=0.05, ts=TS),
    "MarginEvent": dict(event_id="acct-1:7", account="acct-1", seq=7, prev_state="WARNING",
                        state="LIQUIDATION", equity=1000.0, im=2000.0, mm=1500.0,
                        margin_ratio=1.5, shortfall=1000.0, worst_underlying="BTC",
                        worst_scenario=3, worst_pnl=-2000.0,
                        greeks=[dict(underlying="BTC", delta=1.0, gamma=0.0, vega=10.0,
                                     theta=-5.0)],
                        trigger="QUOTE", sources=[dict(topic="q", partition=1, offset=9)],
                        liquidation_plan=[dict(instrument="BTC-PERP", quantity=-0.4)],
                        plan_restores_mm=True, params_version=2, ts=TS),
    "DeadLetter": dict(topic="trades", partition=0, offset=5, key=b"k", value=b"\x00garbage",
                       error_type="CorruptPayload", reason="bad magic", ts=TS),
}


def test_crc64_matches_fastavro():
    for name, parsed in S.load_schemas().items():
        ours = struct.pack("<Q", S.crc64_avro(to_parsing_canonical_form(parsed).encode())).hex()
        assert ours == fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"), name


@pytest.mark.parametrize("name", S.RECORDS)
def test_round_trip(name):
    c = S.Codec()
    data = c.encode(name, GOOD[name])
    assert data[:2] == b"\xc3\x01" and data[2:10] == c.fingerprint(name)
    got_name, rec = c.decode(data)
    assert got_name == name
    for k, v in GOOD[name].items():
        assert rec[k] == v, k


@pytest.mark.parametrize("data,exc", [
    (b"", S.CorruptPayload),
    (b"garbage-garbage-garbage", S.CorruptPayload),
    (b"\xc3\x01" + b"\x00" * 8 + b"\x02", S.UnknownFingerprint),
])
def test_bad_framing(data, exc):
    with pytest.raises(exc):
        S.Codec().decode(data)


def test_truncated_body_and_wrong_type():
    c = S.Codec()
    data = c.encode("Trade", GOOD["Trade"])
    with pytest.raises(S.CorruptPayload):
        c.decode(data[:-5])
    with pytest.raises(S.WrongRecordType):
        c.decode(data, expect="Quote")


@pytest.mark.parametrize("field,value", [("price", float("nan")), ("price", -1.0),
                                         ("quantity", 0.0), ("quantity", 1e12),
                                         ("account", "")])
def test_out_of_domain_on_decode(field, value):
    """A producer that skips validation cannot get NaN or negative prices past the decoder."""
    loose = S.Codec(validate_domain=False)
    data = loose.encode("Trade", dict(GOOD["Trade"], **{field: value}))
    with pytest.raises(S.OutOfDomain) as ei:
        S.Codec().decode(data)
    assert ei.value.field == field


def test_missing_field():
    rec = dict(GOOD["Quote"])
    del rec["mark"]
    with pytest.raises(S.MissingField):
        S.Codec().encode("Quote", rec)


def test_confluent_framing_with_a_registry_client():
    class Registry:  # the registry protocol, in memory (no Schema Registry server here)
        def __init__(self):
            self.schemas = {}

        def register_schema(self, subject, schema):
            sid = len(self.schemas) + 1
            self.schemas[sid] = schema
            return sid

        def get_schema(self, sid):
            return self.schemas[sid]

    c = S.ConfluentCodec("http://unused", client=Registry())
    data = c.encode("Trade", GOOD["Trade"])
    assert data[0] == 0 and struct.unpack(">I", data[1:5])[0] == 1
    assert c.decode(data)[1]["price"] == GOOD["Trade"]["price"]
    fresh = S.ConfluentCodec("http://unused", client=c.client)
    assert fresh.decode(data)[0] == "Trade"
    with pytest.raises(S.UnknownFingerprint):
        fresh.decode(b"\x00\x00\x00\x00\x63" + data[5:])
