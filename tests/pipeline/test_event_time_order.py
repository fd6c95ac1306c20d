"""Trades and collateral changes are applied in event-time order per partition, even when the
collateral topic is fetched later than the trades (a backlog at start, a restart).

The worker starts on a backlog: every account's trades are on the broker, stamped a second after
its deposit, and the deposits sit behind more than a fetch's worth (1 MB per partition) of
malformed records on the collateral topic. The first fetch therefore carries all the trades but
none of the deposits. Taken in arrival order, each opening trade would be applied to an account
with no collateral (a spurious LIQUIDATION event a liquidation bot would act on); aligned, the
margin events are exactly the offline replay's, deposits first.
"""
import os
import time

import pytest
from confluent_kafka import Producer

from schemas import Codec
from streams.publish import Publisher
from tests.pipeline.harness import TopicReader, WorkerProcess
from tests.pipeline.test_crash_and_scale import _check, _wait_all_applied
from tests.pipeline.workload import account_events, publish_reference, replay

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ACCOUNTS = 200
JUNK_PER_PARTITION = 12  # x 100 kB of incompressible bytes: more than one fetch per partition


def test_deposits_behind_a_backlog_are_applied_before_the_later_trades(settings):
    deposits, events = account_events(ACCOUNTS, seed=21)
    expected, proc = replay(deposits + events)
    assert len(expected) > 50
    publish_reference(Publisher(settings))
    codec = Codec()
    producer = Producer({**settings.kafka_conf(), "partitioner": "murmur2_random",
                         "acks": "all", "enable.idempotence": True, "compression.type": "lz4"})
    t_deposit = int(time.time() * 1000) - 60_000
    # wall-clock order: trades first, then the junk, then the deposits; event time (the Kafka
    # timestamp the producer sets) puts every deposit a second before its account's trades
    for k, (topic, name, rec) in enumerate(events):
        producer.produce(settings.topic(topic), codec.encode(name, rec),
                         rec["account"].encode(), timestamp=t_deposit + 1000 + k)
    producer.flush(30)
    for p in range(settings.partitions):
        for _ in range(JUNK_PER_PARTITION):
            producer.produce(settings.topic("collateral"), os.urandom(100_000), b"junk", p,
                             timestamp=t_deposit - 1000)
    for topic, name, rec in deposits:
        producer.produce(settings.topic(topic), codec.encode(name, rec),
                         rec["account"].encode(), timestamp=t_deposit)
    assert producer.flush(30) == 0

    w = WorkerProcess(settings).start()
    try:
        state, want = _wait_all_applied(settings, proc)
        _check(settings, expected, proc, state, want)
        dead = TopicReader(settings, "dead-letters")
        junk = JUNK_PER_PARTITION * settings.partitions
        got = dead.wait(lambda r: len(r) >= junk, 60)
        dead.close()
        assert len(got) == junk and all(d["topic"] == settings.topic("collateral")
                                        for d in got)
    finally:
        w.stop()
    # the order came from the event times, not from the wait bound running out
    assert "out of event-time order" not in w.log()
