"""A risk-parameter change mid-stream re-margins the accounts holding that underlying (and only
those) and emits PARAMS events stamped with the new version."""
import pytest

from streams.publish import Publisher
from tests.pipeline.harness import ChangelogReader, TopicReader, WorkerProcess
from tests.pipeline.workload import T0, publish_reference, quotes

pytestmark = pytest.mark.kafka


def test_params_change_remargins_affected_accounts(settings):
    pub = Publisher(settings)
    publish_reference(pub)
    pub.instrument("ETH-PERP", "PERPETUAL", "ETH", ts=T0)
    pub.quote("ETH-PERP", 3_000.0, 3_000.0, ts=T0)
    pub.flush()
    w = WorkerProcess(settings).start()
    try:
        put = quotes()[1]["mark"]
        for n in range(5):
            pub.collateral(f"d{n}", f"btc-{n}", "USD", 30_000.0, ts=T0)
            pub.trade(f"t{n}", f"btc-{n}", "BTC-55000-P", -2.0, put, ts=T0)
        pub.collateral("de", "eth-0", "USD", 2_000.0, ts=T0)
        pub.trade("te", "eth-0", "ETH-PERP", 1.0, 3_000.0, ts=T0)
        pub.flush()
        cl = ChangelogReader(settings)
        for n in range(5):
            cl.wait_applied(f"btc-{n}", settings.topic("trades"), 0)
        cl.wait_applied("eth-0", settings.topic("trades"), 0)
        cl.close()
        events = TopicReader(settings, "margin-calls")
        before = len(events.poll(1.0))
        # the risk desk widens the BTC scan range from 15% to 40%
        pub.risk_params("BTC", version=2, scan_range=0.40, ts=T0)
        pub.flush()
        got = events.wait(lambda r: sum(e["trigger"] == "PARAMS" for e in r) >= 5, timeout=60)
        events.poll(2.0)
        events.close()
    finally:
        w.stop()
    params = [e for e in got[before:] if e["trigger"] == "PARAMS"]
    assert sorted(e["account"] for e in params) == [f"btc-{n}" for n in range(5)]
    assert all(e["params_version"] == 2 for e in params)
    assert all(e["state"] in ("MARGIN_CALL", "LIQUIDATION") for e in params)
