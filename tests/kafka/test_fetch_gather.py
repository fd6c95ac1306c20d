"""A worker's fetches gather while records flow (streams.feed.gather_while_flowing), against
the real broker: every fetch request after a response with records asks the broker to gather,
every one after an empty response asks to be answered at once, and no record is lost or
reordered either way."""
import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streams.feed import gather_while_flowing

pytestmark = pytest.mark.kafka

IDLE = (1, 20)          # (min bytes, max wait ms): the worker's own settings
GATHERING = (16384, 5)  # the defaults of fetch_gather_bytes / fetch_gather_ms


def test_fetches_gather_only_after_a_fetch_that_returned_records(settings):
    topic = settings.topic("trades")
    seen: list[tuple[tuple[int, int], bool]] = []  # per fetch: what it asked, records or not

    async def run():
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, group_id=None,
            auto_offset_reset="earliest", fetch_min_bytes=IDLE[0],
            fetch_max_wait_ms=IDLE[1])
        consumer.subscribe([topic])
        await consumer.start()
        fetcher = consumer._fetcher
        send = fetcher._client.send

        async def observed_send(node_id, request, *args, **kw):
            response = await send(node_id, request, *args, **kw)
            if type(request).__name__ == "FetchRequest":
                records = any(len(p[-1] or b"") for _, parts in response.topics for p in parts)
                seen.append(((request._min_bytes, request._max_wait_ms), records))
            return response

        fetcher._client.send = observed_send
        gather_while_flowing(fetcher, *GATHERING)
        got: list[bytes] = []

        async def drain(seconds):
            end = asyncio.get_running_loop().time() + seconds
            while asyncio.get_running_loop().time() < end:
                for recs in (await consumer.getmany(timeout_ms=50)).values():
                    got.extend(r.value for r in recs)

        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=0)
        await producer.start()
        try:
            await drain(0.5)  # quiet: nothing to fetch
            sent = []
            flow = asyncio.ensure_future(drain(1.5))
            for k in range(300):  # a record every ~2 ms to one partition: records flow
                v = f"r{k:04d}".encode()
                sent.append(v)
                await producer.send_and_wait(topic, v, partition=0)
                await asyncio.sleep(0.002)
            await flow
            await drain(0.5)  # quiet again
        finally:
            await producer.stop()
            await consumer.stop()
        return sent, got

    sent, got = asyncio.run(run())
    assert got == sent  # one partition: every record, in order, once
    asked = [a for a, _ in seen]
    assert asked[0] == IDLE
    for (_, had_records), nxt in zip(seen, asked[1:]):
        assert nxt == (GATHERING if had_records else IDLE)
    assert sum(r for _, r in seen) >= 2 and GATHERING in asked
    assert seen[-1] == (IDLE, False)  # quiet at the end: answered at once again
