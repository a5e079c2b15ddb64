"""Reply shards: what an adapter read but never delivered is read again, once, by the next holder."""

from __future__ import annotations

import asyncio

from contract import keys
from contract.jobs import Job, ReplyEvent
from contract.replies import GROUP, REPLY_SHARDS, ReplyReader, reply_stream, shard_of
from contract.reply_shards import ShardLeases
from tests.conftest import Queues

CONVERSATION = "slack:D1"
SHARD = shard_of(CONVERSATION)
STREAM = reply_stream("slack", CONVERSATION)


async def publish(redis, text: str) -> None:
    event = ReplyEvent(job_id=f"slack:{text}", conversation=CONVERSATION, kind="final", text=text)
    await redis.xadd(STREAM, {"event": event.model_dump_json()})


async def reader(redis) -> ReplyReader:
    fresh = ReplyReader(redis, "slack")
    await fresh.ensure_groups()
    return fresh


async def test_the_next_holder_reads_the_backlog_once_page_by_page(redis):
    """A restarted adapter used to re-read its whole backlog from id 0 on every read until it was
    acknowledged (20 pending replies and 3 s without an acknowledgement: 288,140 entries handed out)."""
    first = await reader(redis)
    for n in range(250):
        await publish(redis, f"r{n}")
    while await first.read({SHARD}, block_ms=10):
        pass  # read, never acknowledged: the process died
    successor = await reader(redis)
    successor.reread({SHARD})  # it has just taken the shard
    pages = [await successor.read({SHARD}, block_ms=10, count=100) for _ in range(5)]
    assert [len(page) for page in pages] == [100, 100, 50, 0, 0]
    assert [entry.event.text for page in pages for entry in page] == [f"r{n}" for n in range(250)]
    await publish(redis, "new")
    assert [entry.event.text for entry in await successor.read({SHARD}, block_ms=10)] == ["new"]


async def test_a_shard_read_again_gives_its_pending_replies_again(redis):
    holder = await reader(redis)
    await publish(redis, "pending")
    [entry] = await holder.read({SHARD}, block_ms=10)
    assert await holder.read({SHARD}, block_ms=10) == []
    holder.reread({SHARD})
    assert await holder.read(set(), block_ms=10) == []  # not while the shard is not given
    [again] = await holder.read({SHARD}, block_ms=10)
    assert again == entry
    await holder.ack([again])
    assert await holder.read({SHARD}, block_ms=10) == []


async def test_only_the_shards_given_are_read(redis):
    other_shard = next(shard for shard in range(REPLY_SHARDS) if shard != SHARD)
    holder = await reader(redis)
    await publish(redis, "mine")
    assert await holder.read({other_shard}, block_ms=10) == []
    assert [entry.event.text for entry in await holder.read({SHARD}, block_ms=10)] == ["mine"]


def final(n: int) -> tuple[Job, ReplyEvent]:
    job = Job(id=f"slack:{n}", conversation=CONVERSATION, platform="slack", text="q")
    return job, ReplyEvent(job_id=job.id, conversation=job.conversation, kind="final", text=f"answer {n}")


async def test_trimming_never_drops_a_reply_the_adapter_has_not_acknowledged(redis):
    queue = Queues(redis, reply_stream_maxlen=100)
    holder = await reader(redis)  # the adapter started once, then stopped
    for n in range(300):
        await queue.complete(*final(n), [], 10, 60)
    assert await redis.xlen(STREAM) == 300  # a stopped adapter loses nothing
    entries = []
    while batch := await holder.read({SHARD}, block_ms=10):
        entries += batch
        await holder.ack(batch)
    assert [entry.event.text for entry in entries] == [f"answer {n}" for n in range(300)]
    await queue.complete(*final(300), [], 10, 60)
    assert await redis.xlen(STREAM) < 150  # what was acknowledged goes


async def test_a_stream_no_adapter_reads_keeps_only_the_newest_replies(redis):
    queue = Queues(redis, reply_stream_maxlen=100)
    for n in range(300):
        await queue.complete(*final(n), [], 10, 60)
    assert 100 <= await redis.xlen(STREAM) < 200


async def test_unreadable_entries_are_skipped_and_acknowledged(redis, caplog):
    holder = await reader(redis)
    await publish(redis, "read then trimmed")
    await holder.read({SHARD}, block_ms=10)  # pending, then trimmed away by an older worker's MAXLEN
    await redis.xtrim(STREAM, maxlen=0)
    await redis.xadd(STREAM, {"event": '{"job_id": "slack:x", "kind": "thinking"}'})  # a newer worker
    await publish(redis, "fine")
    successor = await reader(redis)
    successor.reread({SHARD})
    assert await successor.read({SHARD}, block_ms=10) == []  # the trimmed backlog entry: skipped
    assert [entry.event.text for entry in await successor.read({SHARD}, block_ms=10)] == ["fine"]
    assert (await redis.xpending(STREAM, GROUP))["pending"] == 1  # only "fine", not yet acked
    assert [r.getMessage() for r in caplog.records].count("unreadable reply event skipped") == 2


# --- shard leases -------------------------------------------------------------------------


def idle(shard: int) -> bool:
    return False


async def test_two_processes_share_the_shards_and_each_shard_has_one_holder(redis):
    first = ShardLeases(redis, "slack", "first", lease_s=5)
    await first.round(idle)
    assert first.held == set(range(REPLY_SHARDS))
    second = ShardLeases(redis, "slack", "second", lease_s=5)
    await second.round(idle)  # all taken: it waits for its share
    assert second.held == set()
    await first.round(idle)  # two live processes: the extra half is delivered, so given up
    await second.round(idle)
    assert len(first.held) == len(second.held) == REPLY_SHARDS // 2
    assert first.held.isdisjoint(second.held)
    holders = [await redis.get(keys.reply_shard("slack", shard)) for shard in range(REPLY_SHARDS)]
    assert sorted(holders) == ["first"] * 4 + ["second"] * 4


async def test_a_shard_with_replies_in_flight_is_given_up_only_once_they_are_delivered(redis):
    first = ShardLeases(redis, "slack", "first", lease_s=5)
    await first.round(idle)
    await ShardLeases(redis, "slack", "second", lease_s=5).round(idle)
    in_flight = {shard for shard in range(REPLY_SHARDS)}
    await first.round(lambda shard: shard in in_flight)
    assert first.held == set(range(REPLY_SHARDS)) and len(first.draining) == REPLY_SHARDS // 2
    assert first.reading == first.held - first.draining  # no new replies read from those
    in_flight.clear()
    await first.round(idle)
    assert len(first.held) == REPLY_SHARDS // 2 and not first.draining


async def test_a_stopped_process_hands_its_shards_over_at_once_and_a_dead_one_when_its_leases_lapse(redis):
    stopping = ShardLeases(redis, "slack", "stopping", lease_s=5)
    await stopping.round(idle)
    await stopping.leave()
    survivor = ShardLeases(redis, "slack", "survivor", lease_s=0.5)
    await survivor.round(idle)
    assert survivor.held == set(range(REPLY_SHARDS))
    dead = ShardLeases(redis, "discord", "dead", lease_s=0.5)
    await dead.round(idle)  # then killed: nothing given up
    heir = ShardLeases(redis, "discord", "heir", lease_s=0.5)
    await heir.round(idle)
    assert heir.held == set()
    await asyncio.sleep(0.6)
    await heir.round(idle)
    assert heir.held == set(range(REPLY_SHARDS))


async def test_a_process_that_lost_its_leases_stops_holding_those_shards(redis):
    slow = ShardLeases(redis, "slack", "slow", lease_s=0.3)
    await slow.round(idle)
    await asyncio.sleep(0.4)  # stalled past its leases (a long pause, Redis unreachable)
    taker = ShardLeases(redis, "slack", "taker", lease_s=5)
    await taker.round(idle)
    await slow.round(idle)
    assert slow.held == set() and taker.held == set(range(REPLY_SHARDS))


async def test_a_round_says_which_shards_it_took_even_one_it_had_lost_and_took_back(redis):
    """Before: a shard whose lease lapsed and was retaken within one round was never read as
    backlog again, so what was in flight when it lapsed stayed pending for good."""
    leases = ShardLeases(redis, "slack", "only", lease_s=0.3)
    assert await leases.round(idle) == set(range(REPLY_SHARDS))
    assert await leases.round(idle) == set()
    await asyncio.sleep(0.4)  # stalled past its leases; nobody else took them
    assert await leases.round(idle) == set(range(REPLY_SHARDS))


async def test_a_process_holds_a_shard_only_while_its_lease_cannot_have_lapsed(redis):
    leases = ShardLeases(redis, "slack", "only", lease_s=0.3)
    await leases.round(idle)
    assert leases.holds(SHARD)
    await asyncio.sleep(0.25)  # no round for two thirds of the lease (Redis slow, or the loop stalled)
    assert not leases.holds(SHARD)
