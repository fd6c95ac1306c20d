"""Bad input through the real broker and a real worker: every bad record lands in
dead-letters with its reason and original bytes, good records keep flowing, the worker lives."""
import math

import pytest

from schemas import Codec
from streams.publish import Publisher
from tests.pipeline.harness import TopicReader, WorkerProcess
from tests.pipeline.workload import T0, publish_reference, quotes

pytestmark = pytest.mark.kafka


def test_bad_records_are_dead_lettered_and_good_ones_flow(settings):
    pub = Publisher(settings)
    loose = Codec(validate_domain=False)
    publish_reference(pub)
    w = WorkerProcess(settings).start()
    try:
        good_quote = quotes()[1]
        trade = dict(trade_id="t", account="good", instrument="BTC-55000-P", quantity=-1.0,
                     price=good_quote["mark"], fee=0.0, ts=T0)
        bad = {}

        def raw(topic, key, value, expect):
            pub.raw(topic, key, value)
            bad[(settings.topic(topic), value)] = expect

        pub.collateral("dep", "good", "USD", 1_000.0, ts=T0)
        raw("trades", b"x", b"garbage bytes", "CorruptPayload")
        raw("trades", b"x", b"\xc3\x01" + b"\x11" * 8 + b"body", "UnknownFingerprint")
        raw("trades", b"x", loose.encode("Quote", good_quote), "SchemaError")  # wrong schema
        raw("trades", b"x", loose.encode("Trade", {**trade, "account": "x",
                                                   "price": math.nan}), "OutOfDomain")
        raw("trades", b"x", loose.encode("Trade", {**trade, "account": "x",
                                                   "instrument": "DOGE-PERP"}),
            "UnknownInstrument")
        raw("trades", b"x", loose.encode("Trade", {**trade, "account": "x"})[:-4],
            "CorruptPayload")  # truncated: a field is missing
        raw("collateral", b"x", loose.encode("CollateralChange", dict(
            change_id="c", account="x", asset="USD", amount=math.inf, kind="DEPOSIT", ts=T0)),
            "OutOfDomain")
        raw("quotes", b"BTC-55000-P", loose.encode("Quote", {**good_quote, "mark": -5.0}),
            "OutOfDomain")
        raw("quotes", b"NOPE", loose.encode("Quote", {**good_quote, "instrument": "NOPE"}),
            "UnknownInstrument")
        pub.trade("t-good", "good", "BTC-55000-P", -1.0, good_quote["mark"], ts=T0)
        pub.flush()

        dlq = TopicReader(settings, "dead-letters")
        got = dlq.wait(lambda r: len(r) >= len(bad), timeout=60)
        dlq.poll(1.0)
        dlq.close()
        assert len(got) == len(bad), [g["error_type"] for g in got]
        for d in got:
            expect = bad[(d["topic"], d["value"])]
            assert d["error_type"] == expect or expect == "SchemaError" and \
                d["error_type"] in ("SchemaError", "WrongRecordType"), d
            assert d["reason"] and d["offset"] >= 0
        reasons = " | ".join(d["reason"] for d in got)
        assert "DOGE-PERP" in reasons and "price" in reasons and "NOPE" in reasons
        # the good account was margined: its trade made it go from HEALTHY to a worse state
        events = TopicReader(settings, "margin-calls")
        ev = events.wait(lambda r: any(e["account"] == "good" for e in r), timeout=60)
        events.close()
        assert [e["state"] for e in ev if e["account"] == "good"] == ["LIQUIDATION"]
        assert w.proc.poll() is None  # no crash
    finally:
        w.stop()


@pytest.mark.slow
def test_ten_thousand_malformed_messages_mixed_into_the_input(settings):
    """10,000 malformed records among good ones: every one is dead-lettered with its reason,
    the worker never crashes, and the good records are all applied."""
    import random
    from tests.pipeline.harness import ChangelogReader
    pub = Publisher(settings)
    publish_reference(pub)
    w = WorkerProcess(settings).start()
    rng = random.Random(5)
    loose = Codec(validate_domain=False)
    put = quotes()[1]["mark"]
    good = 0
    try:
        for n in range(10_000):
            kind = n % 4
            if kind == 0:
                value = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
            elif kind == 1:
                value = b"\xc3\x01" + rng.randbytes(8) + b"x"
            elif kind == 2:
                value = loose.encode("Trade", dict(trade_id=f"b{n}", account=f"bad{n % 50}",
                                                   instrument="BTC-55000-P", quantity=-1.0,
                                                   price=-1.0, fee=0.0, ts=T0))
            else:
                value = loose.encode("Trade", dict(trade_id=f"b{n}", account=f"bad{n % 50}",
                                                   instrument="NOPE", quantity=1.0, price=1.0,
                                                   fee=0.0, ts=T0))
            pub.raw("trades", f"bad{n % 50}".encode(), value)
            if n % 100 == 0:
                pub.trade(f"g{n}", "good", "BTC-55000-P", -0.1, put, ts=T0)
                good += 1
        pub.flush()
        dlq = TopicReader(settings, "dead-letters")
        got = dlq.wait(lambda r: len(r) >= 10_000, timeout=180)
        dlq.poll(1.0)
        dlq.close()
        assert len(got) == 10_000
        assert all(d["reason"] for d in got)
        kinds = {d["error_type"] for d in got}
        assert {"OutOfDomain", "UnknownInstrument"} <= kinds and kinds & {
            "CorruptPayload", "UnknownFingerprint"}
        cl = ChangelogReader(settings)
        rec = cl.wait_applied("good", settings.topic("trades"), 0)
        deadline = __import__("time").time() + 60
        while __import__("time").time() < deadline:
            pos = dict((i, q) for i, q, _ in cl.poll()["good"]["pos"])
            if abs(pos.get("BTC-55000-P", 0) + 0.1 * good) < 1e-9:
                break
        cl.close()
        assert abs(pos.get("BTC-55000-P", 0) + 0.1 * good) < 1e-9, (pos, good, rec)
        assert w.proc.poll() is None
    finally:
        w.stop()
