"""Reply shards: what an adapter read but never delivered is read again, once, by the next holder."""

from __future__ import annotations

import asyncio

from contract import keys
from contract.jobs import Job, ReplyEvent
from contract.replies import GROUP, REPLY_SHARDS, ReplyReader, reply_stream, shard_of
from contract.reply_shards import TRUSTED_PART, ShardLeases
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

LEASE_S = 0.6
TRUSTED_S = LEASE_S * TRUSTED_PART  # how long a missing key stays vacant before a process that did not hold it takes it


async def started(name: str, redis, platform: str = "slack", lease_s: float = LEASE_S) -> ShardLeases:
    """A process whose first rounds found the shards free: it marked them vacant, then took its share."""
    leases = ShardLeases(redis, platform, name, lease_s=lease_s)
    assert await leases.round() == set()  # vacant: another process may still believe it holds them
    await asyncio.sleep(lease_s * TRUSTED_PART)
    await leases.round()
    return leases


async def test_two_processes_share_the_shards_and_each_shard_has_one_holder(redis):
    first = await started("first", redis)
    assert first.held == set(range(REPLY_SHARDS))
    second = ShardLeases(redis, "slack", "second", lease_s=LEASE_S)
    await second.round()  # all taken: it waits for its share
    assert second.held == set()
    await first.round()  # two live processes: half of them are beyond its share
    await first.give_up(first.draining)  # once delivery stopped delivering them: released
    await second.round()  # released shards are taken at once
    assert len(first.held) == len(second.held) == REPLY_SHARDS // 2
    assert first.held.isdisjoint(second.held)
    holders = [await redis.get(keys.reply_shard("slack", shard)) for shard in range(REPLY_SHARDS)]
    assert sorted(holders) == ["first"] * 4 + ["second"] * 4


async def test_shards_beyond_the_fair_share_are_no_longer_read_and_are_given_up_by_the_caller(redis):
    first = await started("first", redis)
    await ShardLeases(redis, "slack", "second", lease_s=LEASE_S).round()
    await first.round()
    assert first.held == set(range(REPLY_SHARDS)) and len(first.draining) == REPLY_SHARDS // 2
    assert first.reading == first.held - first.draining  # no new replies read from those
    await first.give_up(first.draining)  # once delivery stopped delivering them (bot/delivery.py)
    assert len(first.held) == REPLY_SHARDS // 2 and not first.draining


async def test_a_stopped_process_hands_its_shards_over_at_once_and_a_dead_one_once_its_lease_cannot_be_trusted(redis):
    stopping = await started("stopping", redis)
    await stopping.leave()
    survivor = ShardLeases(redis, "slack", "survivor", lease_s=LEASE_S)
    assert await survivor.round() == set(range(REPLY_SHARDS))
    dead = await started("dead", redis, platform="discord")  # then killed: nothing given up
    heir = ShardLeases(redis, "discord", "heir", lease_s=LEASE_S)
    await heir.round()
    assert heir.held == set()
    await asyncio.sleep(LEASE_S + 0.05)  # the leases lapsed: now vacant
    await heir.round()
    assert heir.held == set()  # the dead process could still believe it holds them, were it only slow
    await asyncio.sleep(TRUSTED_S)
    await heir.round()
    assert heir.held == set(range(REPLY_SHARDS)) and not dead.holds(SHARD)


async def test_after_redis_lost_the_leases_their_holder_keeps_its_shards_and_no_other_process_takes_them(redis):
    """Defect 10: after a flush both processes took the missing shards, and the taker read as its backlog
    the replies the holder was still delivering."""
    holder = await started("holder", redis)
    other = ShardLeases(redis, "slack", "other", lease_s=LEASE_S)
    await redis.flushall()  # or a restart without its data, or a failover to an empty replica
    assert await other.round() == set()  # the shards are vacant, and someone may still hold them
    assert holder.holds(SHARD)
    taken_back = await holder.round()
    assert taken_back == set(range(REPLY_SHARDS))  # at once, with their backlog to read again
    await asyncio.sleep(TRUSTED_S)
    await other.round()
    assert other.held == set()
    holders = {await redis.get(keys.reply_shard("slack", shard)) for shard in range(REPLY_SHARDS)}
    assert holders == {"holder"}


async def test_a_process_that_lost_its_leases_stops_holding_those_shards(redis):
    slow = await started("slow", redis)
    await asyncio.sleep(LEASE_S + 0.05)  # stalled past its leases (a long pause, Redis unreachable)
    taker = ShardLeases(redis, "slack", "taker", lease_s=LEASE_S)
    await taker.round()  # vacant now
    await asyncio.sleep(TRUSTED_S)
    await taker.round()
    assert taker.held == set(range(REPLY_SHARDS))
    await slow.round()
    assert slow.held == set()


async def test_a_round_says_which_shards_it_took_even_one_it_had_lost_and_took_back(redis):
    """Before: a shard whose lease lapsed and was retaken within one round was never read as
    backlog again, so what was in flight when it lapsed stayed pending for good."""
    leases = await started("only", redis)
    assert await leases.round() == set()
    await asyncio.sleep(LEASE_S + 0.05)  # stalled past its leases; nobody else took them
    assert await leases.round() == set()  # it cannot trust them any more: vacant, as for anyone else
    await asyncio.sleep(TRUSTED_S)
    assert await leases.round() == set(range(REPLY_SHARDS))


async def test_a_process_holds_a_shard_only_while_its_lease_cannot_have_lapsed(redis):
    leases = await started("only", redis)
    assert leases.holds(SHARD)
    await asyncio.sleep(TRUSTED_S + 0.02)  # no round for two thirds of the lease (Redis slow, or the loop stalled)
    assert not leases.holds(SHARD)
