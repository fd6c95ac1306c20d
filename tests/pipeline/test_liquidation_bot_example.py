"""The outsider's bot in ops/examples decodes our margin-calls with only the .avsc files."""
import subprocess
import sys

import pytest

from streams.publish import Publisher
from tests.pipeline.harness import REPO, TopicReader, WorkerProcess
from tests.pipeline.workload import T0, publish_reference, quotes

pytestmark = pytest.mark.kafka


def test_bot_follows_margin_calls_end_to_end(settings, tmp_path):
    pub = Publisher(settings)
    publish_reference(pub)
    w = WorkerProcess(settings).start()
    try:
        pub.collateral("dep", "whale", "USD", 20_000.0, ts=T0)
        pub.trade("t1", "whale", "BTC-55000-P", -12.0, quotes()[1]["mark"], ts=T0)
        pub.flush()
        ev = TopicReader(settings, "margin-calls").wait(
            lambda r: any(e["state"] == "LIQUIDATION" for e in r))
    finally:
        w.stop()
    # a duplicate delivery of the same event (at-least-once) must be ignored by the bot
    from schemas import Codec
    pub.raw("margin-calls", b"whale", Codec().encode("MarginEvent", ev[0]))
    pub.flush()
    # copy only the .avsc files: the bot sees nothing else of riskpipe
    schemas = tmp_path / "contract"
    for p in (REPO / "schemas").rglob("*.avsc"):
        dst = schemas / p.relative_to(REPO / "schemas")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(p.read_bytes())
    r = subprocess.run([sys.executable, str(REPO / "ops/examples/liquidation_bot.py"),
                        "--bootstrap", settings.kafka_bootstrap, "--topic",
                        settings.topic("margin-calls"), "--schemas", str(schemas),
                        "--timeout", "5"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "whale:1 HEALTHY -> LIQUIDATION" in out
    assert "LIQUIDATE whale: BUY" in out and "BTC-55000-P" in out
    assert "duplicate whale:1 ignored" in out
