"""The account feed between Faust's consumer and the accounts agent: order, batching bounds,
backpressure and what a revocation drops (the Kafka side is covered by the pipeline tests)."""
import asyncio
from types import SimpleNamespace

from streams.feed import AccountFeed


def _fetch(topic, partition, offsets):
    return {(topic, partition): [SimpleNamespace(topic=topic, partition=partition, offset=o)
                                 for o in offsets]}


def _offsets(records):
    return [(r.topic, r.partition, r.offset) for r in records]


def test_take_keeps_partition_order_and_bounds_batches_by_whole_fetches():
    async def run():
        feed = AccountFeed(["t"])
        await feed.put(feed.epoch, _fetch("t", 0, range(0, 3)))
        await feed.put(feed.epoch, _fetch("t", 1, range(0, 2)))
        await feed.put(feed.epoch, _fetch("t", 0, range(3, 7)))
        first = await feed.take(5)   # 3 + 2 fit; the next fetch of 4 would exceed 5
        second = await feed.take(5)
        return first, second
    (e1, b1), (e2, b2) = asyncio.run(run())
    assert e1 == e2 == 0
    assert _offsets(b1) == [("t", 0, 0), ("t", 0, 1), ("t", 0, 2), ("t", 1, 0), ("t", 1, 1)]
    assert _offsets(b2) == [("t", 0, o) for o in range(3, 7)]


def test_a_fetch_larger_than_the_batch_bound_is_still_delivered_whole():
    async def run():
        feed = AccountFeed(["t"])
        await feed.put(feed.epoch, _fetch("t", 0, range(10)))
        return await feed.take(3)
    _, batch = asyncio.run(run())
    assert len(batch) == 10


def test_revocation_drops_queued_and_late_fetches_and_bumps_the_epoch():
    async def run():
        feed = AccountFeed(["t"])
        old = feed.epoch
        await feed.put(old, _fetch("t", 0, range(3)))
        feed.revoke()
        await feed.put(old, _fetch("t", 0, range(3, 5)))   # fetched before the revocation
        await feed.put(feed.epoch, _fetch("t", 0, range(0, 2)))  # re-read after the seek
        epoch, batch = await feed.take(100)
        return old, epoch, batch
    old, epoch, batch = asyncio.run(run())
    assert epoch == old + 1
    assert _offsets(batch) == [("t", 0, 0), ("t", 0, 1)]


def test_a_full_feed_blocks_the_fetch_loop_until_the_agent_takes():
    async def run():
        feed = AccountFeed(["t"], max_fetches=2)
        await feed.put(0, _fetch("t", 0, [0]))
        await feed.put(0, _fetch("t", 0, [1]))
        blocked = asyncio.ensure_future(feed.put(0, _fetch("t", 0, [2])))
        await asyncio.sleep(0.05)
        was_blocked = not blocked.done()
        first = await feed.take(1)
        await asyncio.wait_for(blocked, 1)
        rest = await feed.take(100)
        return was_blocked, first, rest
    was_blocked, (_, first), (_, rest) = asyncio.run(run())
    assert was_blocked
    assert _offsets(first) == [("t", 0, 0)]
    assert _offsets(rest) == [("t", 0, 1), ("t", 0, 2)]
