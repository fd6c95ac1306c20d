"""The CLI's product surface: --help everywhere, one-line errors, what-if from Kafka state."""
import subprocess
import sys

import pytest

from streams.publish import Publisher
from tests.pipeline.harness import REPO, ChangelogReader, WorkerProcess
from tests.pipeline.workload import T0, publish_reference, quotes

COMMANDS = ["worker", "demo", "simulate", "tail", "sql", "init", "bench", "kafka", "whatif"]


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "Usage" in r.stdout


def test_user_mistakes_are_one_line_errors():
    for args in (["whatif", "a", "BAD"], ["sql", "--format", "xml", "SELECT 1"],
                 ["simulate", "--scenario", "meteor"], ["sql", "--named", "nope"]):
        r = run(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.startswith("riskpipe: "), r.stderr
    import os
    r = run("init", env=dict(os.environ, RISKPIPE_KAFKA_BOOTSTRAPP="typo"))
    assert r.returncode == 2 and "unknown setting" in r.stderr


@pytest.mark.kafka
def test_whatif_uses_the_workers_state(settings):
    from streams.whatif import what_if
    pub = Publisher(settings)
    publish_reference(pub)
    w = WorkerProcess(settings).start()
    try:
        pub.collateral("d", "alice", "USD", 50_000.0, ts=T0)
        pub.flush()
        cl = ChangelogReader(settings)
        cl.wait_applied("alice", settings.topic("collateral"), 0)
        cl.close()
    finally:
        w.stop()
    put = quotes()[1]["mark"]
    res = what_if(settings, "alice", [("BTC-55000-P", -2.0, put)])
    assert res["before"]["im"] == 0 and res["before"]["equity"] == 50_000.0
    assert res["after"]["im"] > 0 and res["accepted"]
    with pytest.raises(ValueError):
        what_if(settings, "nobody", [("BTC-55000-P", -2.0, put)])
