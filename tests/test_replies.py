"""Reply streams: what an adapter read but never delivered is delivered after a restart."""

from __future__ import annotations

from engine.jobs import ReplyEvent
from engine.queue import replies_key
from engine.replies import ReplyReader


async def publish(redis, text: str) -> None:
    event = ReplyEvent(job_id=f"slack:{text}", conversation="slack:D1", kind="final", text=text)
    await redis.xadd(replies_key("slack"), {"event": event.model_dump_json()})


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
