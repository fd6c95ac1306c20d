"""A fetch request that ends in the same moment as buffered records are taken does not leave
the consumer idle (streams.feed.wake_after_fetch), against the real broker.

The race is made to happen on every fetch: as each request ends, the test signals "records
taken" first, so the fetcher's routine runs before the callback that frees the broker. The
routine's poll timeout is set to an hour, so only the wake-up can start the next fetch. Without
it the consumer stops fetching (the first case shows the race is real: should a later aiokafka
close it, that case fails and the wrapper can go); with it a record sent later still
arrives."""
import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.feed import wake_after_fetch

pytestmark = pytest.mark.kafka


async def _delivered_within(settings, topic: str, seconds: float, wake: bool) -> bool:
    """Send one record after the fetcher has raced a few times; True if it arrived in time."""
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                fetch_max_wait_ms=20)
    consumer.assign([tp])
    await consumer.start()
    await consumer.seek_to_end(tp)
    fetcher = consumer._fetcher
    fetcher._fetcher_timeout = 3600.0  # the routine's own poll timeout out of the picture
    proc = fetcher._proc_fetch_request

    async def racing(assignment, node_id, request):
        got = await proc(assignment, node_id, request)
        fetcher._notify(fetcher._wait_consume_future)  # records taken as the request ends
        await asyncio.sleep(0)  # the routine is queued to run before the request's callbacks
        return got

    fetcher._proc_fetch_request = racing
    if wake:
        wake_after_fetch(fetcher)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        await asyncio.sleep(0.5)  # idle fetches of 20 ms each, every one of them racing
        await producer.send_and_wait(topic, b"late", partition=0)
        end = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < end:
            got = await consumer.getmany(tp, timeout_ms=100)
            if any(r.value == b"late" for r in got.get(tp, [])):
                return True
        return False
    finally:
        await producer.stop()
        await consumer.stop()


def test_the_next_fetch_does_not_wait_for_the_poll_timeout(settings):
    topic = settings.topic("trades")
    assert not asyncio.run(_delivered_within(settings, topic, 2.0, wake=False))
    assert asyncio.run(_delivered_within(settings, topic, 10.0, wake=True))
