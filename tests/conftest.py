"""Shared fixtures: a real Apache Kafka broker for the session, unique topics per test.

The broker is the project's own ``ops/kafka`` on a dedicated port (19092), or an existing
cluster named by ``RISKPIPE_TEST_KAFKA`` (bootstrap servers). If it cannot start, every test that
needs it fails with the broker's log: integration tests never skip silently.
"""
from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_KAFKA_PORT = os.environ.get("RISKPIPE_TEST_KAFKA_PORT", "19092")


@pytest.fixture(scope="session")
def kafka_bootstrap():
    existing = os.environ.get("RISKPIPE_TEST_KAFKA")
    if existing:
        yield existing
        return
    env = dict(os.environ, KAFKA_PORT=TEST_KAFKA_PORT)
    subprocess.run([str(REPO / "ops" / "kafka"), "reset"], env=env, capture_output=True)
    r = subprocess.run([str(REPO / "ops" / "kafka"), "up"], env=env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"local Kafka broker failed to start (ops/kafka up):\n{r.stdout}\n{r.stderr}",
                    pytrace=False)
    try:
        yield f"127.0.0.1:{TEST_KAFKA_PORT}"
    finally:
        subprocess.run([str(REPO / "ops" / "kafka"), "down"], env=env, capture_output=True)


@pytest.fixture
def unique():
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(kafka_bootstrap, unique, tmp_path):
    from streams.settings import Settings
    from streams.topics import create_topics
    s = Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=f"t{unique}.",
                 app_id=f"riskpipe-test-{unique}", data_dir=tmp_path / "data", partitions=4,
                 web_port=0)
    create_topics(s)
    return s
