"""A trade in an instrument listed a moment before it is applied at once, while market ticks keep
the broadcast reader busy.

The accounts agent waits for the broadcast reader to apply the new instrument. It used to wait
while holding the work lock, which the reader's next market tick also needs: the two waited on
each other until the wait timed out (10 s), and the trade was then dead-lettered as naming an
unlisted instrument. The broadcast reader also holds a quote whose instrument it does not
know yet, since the Instrument record travels on another topic and may be fetched later."""
import threading
import time
from datetime import timedelta

import pytest

from streams.publish import Publisher
from tests.pipeline.harness import ChangelogReader, TopicReader, WorkerProcess
from tests.pipeline.workload import EXP, T0, publish_reference

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ACCOUNTS = 1000
LISTINGS = 12


def test_trades_in_just_listed_instruments_are_applied_while_ticks_run(settings):
    pub = Publisher(settings)
    publish_reference(pub)
    w = WorkerProcess(settings).start()
    stop = threading.Event()
    try:
        for a in range(ACCOUNTS):  # holders of BTC-PERP: every quote re-margins all of them
            pub.collateral(f"d{a}", f"acct-{a:04d}", "USD", 50_000.0, ts=T0)
            pub.trade(f"o{a}", f"acct-{a:04d}", "BTC-PERP", 0.5, 60_000.0, ts=T0)
        pub.flush()

        def market():
            """Quotes and trades on the listed instruments, as a live market."""
            feed = Publisher(settings)
            k = 0
            while not stop.is_set():
                spot = 60_000.0 + 50.0 * ((k % 40) - 20)
                feed.quote("BTC-PERP", spot, spot, ts=T0 + timedelta(milliseconds=k))
                feed.trade(f"m{k}", f"acct-{k % ACCOUNTS:04d}", "BTC-PERP", 0.01, spot,
                           ts=T0 + timedelta(milliseconds=k))
                feed.producer.poll(0)
                k += 1
                time.sleep(0.005)
            feed.flush()

        t = threading.Thread(target=market, daemon=True)
        t.start()
        time.sleep(2.0)
        t0 = time.time()
        for n in range(LISTINGS):
            inst = f"BTC-FUT-{n}"
            pub.instrument(inst, "FUTURE", "BTC", expiry=EXP, ts=T0)
            pub.quote(inst, 60_100.0, 60_000.0, ts=T0)
            pub.flush()
            pub.trade(f"new{n}", f"acct-{n:04d}", inst, 0.1, 60_100.0, ts=T0)
            pub.flush()
            time.sleep(0.25)
        cl = ChangelogReader(settings)
        deadline = time.time() + 60
        want = {f"acct-{n:04d}": f"BTC-FUT-{n}" for n in range(LISTINGS)}
        held = {}
        while time.time() < deadline and len(held) < LISTINGS:
            for acct, inst in want.items():
                rec = cl.poll(0.2).get(acct)
                if rec and any(p[0] == inst for p in rec["pos"]):
                    held.setdefault(acct, time.time() - t0)
        cl.close()
        stop.set()
        t.join(10)
        dead = TopicReader(settings, "dead-letters").poll(2.0)
    finally:
        stop.set()
        w.stop()
    assert dead == [], [(d["topic"], d["reason"]) for d in dead]
    assert len(held) == LISTINGS, sorted(set(want) - set(held))
    # every listing was traded within a few seconds of its publication (no 10 s stall)
    assert max(held.values()) < LISTINGS * 0.25 + 5.0, held
    assert "unexpected error" not in w.log()
