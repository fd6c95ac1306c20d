"""End to end through the real broker and a real worker process: deposit, options trades, a
crash in quotes drives WARNING -> MARGIN_CALL -> LIQUIDATION, a deposit brings the account back.
The exact event sequence is asserted, and every number is compared with an offline replay of the
same records through the engine (valuation at event time makes them bit-identical)."""
from datetime import datetime, timedelta, timezone

import pytest

from engine.pricing import option_greeks
from streams.processor import RiskProcessor
from streams.publish import Publisher
from tests.pipeline.harness import ChangelogReader, TopicReader, WorkerProcess

pytestmark = pytest.mark.kafka

T0 = datetime(2026, 11, 22, tzinfo=timezone.utc)
EXP = datetime(2026, 12, 22, 8, tzinfo=timezone.utc)
K = 55_000.0


def put_quote(spot, step):
    t = (EXP - T0).total_seconds() / (365 * 86400)
    mark = float(option_greeks(spot, K, t, 0.6, 0.0, False)[0])
    return dict(instrument="BTC-55000-P", mark=mark, index_price=spot, mark_iv=0.6,
                ts=T0 + timedelta(seconds=step))


INSTRUMENT = dict(id="BTC-55000-P", kind="PUT", underlying="BTC", settlement="LINEAR",
                  multiplier=1.0, strike=K, expiry=EXP, lot_size=0.1, ts=T0)


def start_put_market(settings):
    """The put listed and quoted at 60,000, then a worker started: (publisher, quote, worker)."""
    pub = Publisher(settings)
    pub.record("instruments", "Instrument", INSTRUMENT["id"], INSTRUMENT)
    q0 = put_quote(60_000, 0)
    pub.record("quotes", "Quote", q0["instrument"], q0)
    pub.flush()
    return pub, q0, WorkerProcess(settings).start()


def test_flash_crash_story(settings):
    pub, q0, w = start_put_market(settings)
    events = TopicReader(settings, "margin-calls")
    changelog = ChangelogReader(settings)
    try:
        pub.collateral("dep-1", "alice", "USD", 75_000.0, ts=T0)
        pub.flush()
        # trades and collateral are separate topics: Kafka orders records within one, so the
        # story waits for the deposit before trading (as a real account must be funded first)
        changelog.wait_applied("alice", settings.topic("collateral"), 0)
        for n in range(5):
            pub.trade(f"t{n}", "alice", "BTC-55000-P", -2.0, q0["mark"], ts=T0)
        pub.flush()
        changelog.wait_applied("alice", settings.topic("trades"), 4)
        changelog.wait_applied("alice", settings.topic("collateral"), 0)
        time = 1
        expected_states = []
        for spot, state in ((58_000, "WARNING"), (56_000, "MARGIN_CALL"),
                            (53_000, "LIQUIDATION")):
            q = put_quote(spot, time)
            time += 1
            pub.record("quotes", "Quote", q["instrument"], q)
            pub.flush()
            expected_states.append(state)
            events.wait(lambda r, n=len(expected_states): len(r) >= n, timeout=60)
        pub.collateral("dep-2", "alice", "USD", 50_000.0, ts=T0 + timedelta(seconds=10))
        pub.flush()
        got = events.wait(lambda r: len(r) >= 4, timeout=60)
        events.poll(2.0)  # nothing else may follow
    finally:
        events.close()
        changelog.close()
        w.stop()

    assert [(e["event_id"], e["prev_state"], e["state"], e["trigger"]) for e in got] == [  # noqa
        ("alice:1", "HEALTHY", "WARNING", "QUOTE"),
        ("alice:2", "WARNING", "MARGIN_CALL", "QUOTE"),
        ("alice:3", "MARGIN_CALL", "LIQUIDATION", "QUOTE"),
        ("alice:4", "LIQUIDATION", "HEALTHY", "COLLATERAL"),
    ], [(e["equity"], e["im"], e["mm"], e["sources"]) for e in got]
    liq = got[2]
    assert liq["liquidation_plan"] and liq["plan_restores_mm"]
    assert all(s["instrument"] == "BTC-55000-P" and s["quantity"] > 0
               for s in liq["liquidation_plan"])
    assert got[3]["sources"][0]["topic"] == settings.topic("collateral")
    assert got[1]["shortfall"] == pytest.approx(got[1]["im"] - got[1]["equity"])

    # offline replay of the same records through the engine: identical numbers
    proc = RiskProcessor()
    proc.apply_instrument(INSTRUMENT)
    proc.apply_quote(q0)
    proc.on_market_tick()
    proc.apply_account_events(
        [("CollateralChange", dict(account="alice", asset="USD", amount=75_000.0, ts=T0),
          "c", 0, 0)] +
        [("Trade", dict(account="alice", instrument="BTC-55000-P", quantity=-2.0,
                        price=q0["mark"], fee=0.0, ts=T0), "t", 0, n) for n in range(5)])
    replay = []
    for step, spot in enumerate((58_000, 56_000, 53_000), start=1):
        proc.apply_quote(put_quote(spot, step))
        replay += proc.on_market_tick().events
    replay += proc.apply_account_events([("CollateralChange", dict(
        account="alice", asset="USD", amount=50_000.0, ts=T0), "c", 0, 1)]).events
    for a, b in zip(got, replay):
        for f in ("equity", "im", "mm", "margin_ratio", "shortfall", "worst_pnl"):
            assert a[f] == b[f], (a["event_id"], f, a[f], b[f])
        assert a["liquidation_plan"] == b["liquidation_plan"]
    # the analysts' store got the same events once, and the latest state
    from streams.settings import Settings
    from streams.store import open_store
    dsn = w.env["RISKPIPE_CLICKHOUSE_DSN"]
    with open_store(Settings(clickhouse_dsn=dsn)) as st:
        hist = st.named("history", account="alice").result_rows
        assert [(r[0], r[2], r[3]) for r in hist] == [(e["event_id"], e["prev_state"],
                                                       e["state"]) for e in got]
        assert [r[5] for r in hist] == [e["equity"] for e in got]
        latest = st.named("latest").result_rows
        assert [(r[0], r[1]) for r in latest] == [("alice", "HEALTHY")]
        assert latest[0][2] == got[3]["equity"]
        expo = dict((r[0], r[1]) for r in st.named("exposure").result_rows)
        assert expo["BTC"] == pytest.approx(got[3]["greeks"][0]["delta"])

    # and the numbers make sense: liquidation means equity below MM
    assert liq["equity"] < liq["mm"] < liq["im"]
    assert got[3]["equity"] >= 1.2 * got[3]["im"] * 1.05
