"""Reply streams: what an adapter read but never delivered is delivered after a restart."""

from __future__ import annotations

import asyncio

from contract import keys
from contract.jobs import Job, ReplyEvent
from contract.replies import GROUP, ReplyReader
from tests.conftest import Queues


async def publish(redis, text: str) -> None:
    event = ReplyEvent(job_id=f"slack:{text}", conversation="slack:D1", kind="final", text=text)
    await redis.xadd(keys.replies("slack"), {"event": event.model_dump_json()})


async def test_a_restarted_consumer_rereads_what_it_never_acknowledged(redis):
    first = ReplyReader(redis, "slack", "adapter")
    await first.ensure_group()
    await publish(redis, "one")
    [(entry_id, event)] = await first.read(block_ms=10)
    again = ReplyReader(redis, "slack", "adapter")
    await again.ensure_group()
    assert [e.text for _, e in await again.read(block_ms=10)] == ["one"]
    await again.ack(entry_id)
    assert await again.read(block_ms=10) == []


async def test_a_new_consumer_adopts_a_vanished_ones_pending_replies(redis):
    old = ReplyReader(redis, "slack", "container-a")
    await old.ensure_group()
    await publish(redis, "half delivered")
    await old.read(block_ms=10)
    fresh = ReplyReader(redis, "slack", "container-b", take_over_after_ms=0)
    await fresh.ensure_group()
    assert [e.text for _, e in await fresh.read(block_ms=10)] == ["half delivered"]


async def test_a_live_consumers_recent_replies_are_left_alone(redis):
    live = ReplyReader(redis, "slack", "container-a")
    await live.ensure_group()
    await publish(redis, "in flight")
    await live.read(block_ms=10)
    other = ReplyReader(redis, "slack", "container-b")  # the default waits 30 s before adopting
    await other.ensure_group()
    assert await other.read(block_ms=10) == []


def final(n: int) -> tuple[Job, ReplyEvent]:
    job = Job(id=f"slack:{n}", conversation="slack:D1", platform="slack", text="q")
    return job, ReplyEvent(job_id=job.id, conversation=job.conversation, kind="final", text=f"answer {n}")


async def test_trimming_never_drops_a_reply_the_adapter_has_not_acknowledged(redis):
    queue = Queues(redis, reply_stream_maxlen=100)
    reader = ReplyReader(redis, "slack", "adapter")
    await reader.ensure_group()  # the adapter started once, then stopped
    for n in range(300):
        await queue.complete(*final(n), [], 10, 60)
    assert await redis.xlen(keys.replies("slack")) == 300  # a stopped adapter loses nothing
    events = []
    while batch := await reader.read(block_ms=10):
        events += batch
        await reader.ack(*(entry_id for entry_id, _ in batch))
    assert [event.text for _, event in events] == [f"answer {n}" for n in range(300)]
    await queue.complete(*final(300), [], 10, 60)
    assert await redis.xlen(keys.replies("slack")) < 150  # what was acknowledged goes


async def test_a_stream_no_adapter_reads_keeps_only_the_newest_replies(redis):
    queue = Queues(redis, reply_stream_maxlen=100)
    for n in range(300):
        await queue.complete(*final(n), [], 10, 60)
    assert 100 <= await redis.xlen(keys.replies("slack")) < 200


async def test_unreadable_entries_are_skipped_and_acknowledged(redis, caplog):
    reader = ReplyReader(redis, "slack", "adapter")
    await reader.ensure_group()
    await publish(redis, "read then trimmed")
    await reader.read(block_ms=10)  # pending, then trimmed away by an older worker's MAXLEN
    await redis.xtrim(keys.replies("slack"), maxlen=0)
    await redis.xadd(keys.replies("slack"), {"event": '{"job_id": "slack:x", "kind": "thinking"}'})  # a newer worker
    await publish(redis, "fine")
    restarted = ReplyReader(redis, "slack", "adapter")
    assert [e.text for _, e in await restarted.read(block_ms=10)] == ["fine"]  # no crash on the others
    assert (await redis.xpending(keys.replies("slack"), GROUP))["pending"] == 1  # only "fine", not yet acked
    assert [r.getMessage() for r in caplog.records].count("unreadable reply event skipped") == 2


async def test_replies_a_vanished_consumer_left_pending_are_adopted_while_running(redis):
    old = ReplyReader(redis, "slack", "slack-oldhost")
    await old.ensure_group()
    current = ReplyReader(redis, "slack", "slack-adapter", take_over_after_ms=50, adopt_every_s=0)
    assert await current.read(block_ms=10) == []
    await publish(redis, "stranded")
    await old.read(block_ms=10)  # read by the old container, which then went away
    await asyncio.sleep(0.1)
    assert [e.text for _, e in await current.read(block_ms=10)] == ["stranded"]
