"""Every record type through the real broker: produce with confluent-kafka, consume, decode."""
import pytest
from confluent_kafka import Consumer, Producer

import schemas as S
from tests.contract.test_codec import GOOD

pytestmark = pytest.mark.kafka


def consume(settings, topic, n, timeout=30.0):
    c = Consumer({**settings.kafka_conf(), "group.id": f"{settings.app_id}-{topic}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    out = []
    import time
    deadline = time.time() + timeout
    while len(out) < n and time.time() < deadline:
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        out.append(m)
    c.close()
    return out


def test_every_schema_round_trips(settings):
    codec = S.Codec()
    p = Producer(settings.kafka_conf())
    topic = settings.topic("roundtrip")
    for name in S.RECORDS:
        p.produce(topic, key=name.encode(), value=codec.encode(name, GOOD[name]))
    assert p.flush(30) == 0
    msgs = consume(settings, topic, len(S.RECORDS))
    assert len(msgs) == len(S.RECORDS)
    for m in msgs:
        name, rec = codec.decode(m.value())
        assert name == m.key().decode()
        assert rec == {k: rec[k] for k in GOOD[name]} and all(rec[k] == v
                                                              for k, v in GOOD[name].items())


def test_init_is_idempotent(settings):
    from streams.topics import create_topics
    again = create_topics(settings)
    assert set(again.values()) == {"exists"}
