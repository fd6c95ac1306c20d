"""The broker is stopped and restarted mid-run: the worker reconnects and nothing is lost or
changed (final tables and margin event ids equal the offline replay; ClickHouse after FINAL holds
every margin event and snapshot once). Runs its own broker so the
session broker is not disturbed."""
import os
import subprocess
import threading
import time

import pytest

from streams.publish import Publisher
from streams.settings import Settings
from streams.topics import create_topics
from tests.pipeline.harness import REPO, WorkerProcess, free_port
from tests.pipeline.test_crash_and_scale import _check, _check_clickhouse, _publish, \
    _publish_deposits, _wait_all_applied
from tests.pipeline.workload import account_events, publish_reference, replay

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
PORT = os.environ.get("RISKPIPE_TEST_KAFKA_RESTART_PORT", "19192")


def _kafka(cmd):
    env = dict(os.environ, KAFKA_PORT=PORT)
    return subprocess.run([str(REPO / "ops" / "kafka"), cmd], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def own_broker(kafka_bootstrap, unique, tmp_path):
    if os.environ.get("RISKPIPE_TEST_KAFKA"):
        pytest.fail("the broker-restart test needs the local ops/kafka broker", pytrace=False)
    _kafka("reset")
    r = _kafka("up")
    assert r.returncode == 0, r.stderr
    s = Settings(kafka_bootstrap=f"127.0.0.1:{PORT}", topic_prefix=f"r{unique}.",
                 app_id=f"riskpipe-restart-{unique}", data_dir=tmp_path / "data", web_port=0)
    create_topics(s)
    yield s
    _kafka("down")


def test_broker_stop_and_restart_mid_run(own_broker):
    s = own_broker
    deposits, events = account_events(150, seed=21)
    expected, proc = replay(deposits + events)
    publish_reference(Publisher(s))
    port = free_port()
    w = WorkerProcess(s, extra_env={"RISKPIPE_WEB_PORT": str(port)}).start()
    try:
        _publish_deposits(s, deposits)
        half = len(events) // 2
        _publish(s, events[:half])
        assert _kafka("down").returncode == 0
        time.sleep(5)
        assert _kafka("up").returncode == 0
        t = threading.Thread(target=_publish, args=(s, events[half:]))
        t.start()
        t.join(120)
        state, want = _wait_all_applied(s, proc, timeout=180)
        _check(s, expected, proc, state, want)
        stored, snaps = _check_clickhouse(s, port, expected)
        assert w.proc.poll() is None, "the worker must survive a broker restart"
    finally:
        w.stop()
