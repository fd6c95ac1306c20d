"""The output producer's marks, against the real broker: a mark resolves once every record
queued before it is in the log, and only those; a delivery error fails the marks made after
the failed record, never one made before it."""
import asyncio
import os

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streams.outputs import OutputError, OutputProducer

pytestmark = pytest.mark.kafka


def _topic(settings, name, **config):
    topic = settings.topic(name)
    admin = AdminClient(settings.kafka_conf())  # kept until the topic exists
    fs = admin.create_topics(
        [NewTopic(topic, 3, 1, config={k.replace("_", "."): str(v)
                                       for k, v in config.items()})])
    for f in fs.values():
        f.result(30)
    return topic


def _in_log(settings, topic) -> int:
    c = Consumer({**settings.kafka_conf(), "group.id": f"{topic}-ends"})
    try:
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   for p in range(3))
    finally:
        c.close()


def test_a_mark_covers_the_records_before_it(settings):
    topic = _topic(settings, "marks")
    out = OutputProducer(settings)

    async def run():
        await asyncio.wait_for(out.mark(), 5)  # nothing queued: at once
        for i in range(500):
            out.send(topic, f"k{i}".encode(), b"x" * 100, i % 3 if i % 2 else None)
        first = out.mark()
        for i in range(500, 800):
            out.send(topic, f"k{i}".encode(), b"y" * 100)
        second = out.mark()
        await asyncio.wait_for(first, 30)
        assert _in_log(settings, topic) >= 500
        await asyncio.wait_for(second, 30)
        assert _in_log(settings, topic) == 800
        done = []
        marks = [out.mark() for _ in range(3)]  # nothing more queued: resolve in order
        for m in marks:
            m.add_done_callback(lambda f: done.append(f))
        await asyncio.wait_for(asyncio.gather(*marks), 5)
        assert done == marks
        await out.flush(30)
    try:
        asyncio.run(run())
    finally:
        out.close()


def test_a_delivery_error_fails_later_marks_only(settings):
    # the broker refuses records over 10 kB on this topic (the client would send 1 MB)
    topic = _topic(settings, "marks-small", max_message_bytes=10_000)
    out = OutputProducer(settings)

    async def run():
        out.send(topic, b"ok", b"a" * 100)
        before = out.mark()
        out.send(topic, b"big", os.urandom(50_000))  # incompressible: over the limit
        after = out.mark()
        await asyncio.wait_for(before, 30)  # not failed by a record queued after it
        with pytest.raises(OutputError, match="big|TOO_LARGE|too large"):
            await asyncio.wait_for(after, 30)
        out.send(topic, b"ok2", b"b" * 100)  # delivered, but the failure is not forgotten
        with pytest.raises(OutputError):
            await out.flush(30)
    try:
        asyncio.run(run())
    finally:
        out.close()
    assert _in_log(settings, topic) == 2
