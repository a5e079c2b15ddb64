"""Reply delivery across adapter processes, restarts and slow platforms, against fake outboxes."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from bot.delivery import ABANDONED_AFTER_S, FAILED, Delivery, Shown, request_sent
from contract import keys
from contract.jobs import ReplyEvent
from contract.replies import REPLY_SHARDS, ReplyReader, reply_stream, shard_of
from service.redis_client import connect
from service.redis_server import RedisServer
from service.tasks import cancel_until_done

LEASE_S = 0.6  # adapter_lease_s in these tests: a process's shards change hands within a second


class Recording:
    limit = 2000
    settles = False

    def refused(self, error: Exception) -> bool:
        return False  # what these tests make fail is a passing failure (a 5xx, an internal_error)

    def __init__(self, post_delay_s: float = 0.0):
        self.post_delay_s = post_delay_s
        self.posted: list[str | None] = []
        self.jobs: list[str] = []  # the job of each posted message
        self.edits = 0

    async def post(self, part):
        await asyncio.sleep(self.post_delay_s)
        self.posted.append(part.text)
        self.jobs.append(part.job_id)
        return str(len(self.posted))

    async def edit(self, message_id, part):
        self.edits += 1
        self.posted[int(message_id) - 1] = part.text

    async def remove(self, message_id, reply_to):
        self.posted[int(message_id) - 1] = None


class Nowhere(Recording):
    async def post(self, part):
        raise AssertionError("nothing should be posted")


def event(n: int, kind: str = "final", text: str | None = None, conversation: str | None = None) -> ReplyEvent:
    return ReplyEvent(
        job_id=f"slack:{n}", conversation=conversation or f"slack:D{n}", kind=kind, text=text or f"answer {n}"
    )


async def publish(redis, reply: ReplyEvent) -> None:
    await redis.xadd(reply_stream("slack", reply.conversation), {"event": reply.model_dump_json()})


@contextlib.asynccontextmanager
async def adapter_process(
    redis, outbox, name: str, edit_interval_s: float = 0.0, leaves: bool = True, lease_s: float = LEASE_S
):
    """One adapter process's delivery, running until the block ends; `leaves=False` dies without a word."""
    delivery = Delivery(redis, "slack", outbox, edit_interval_s, lease_s, holder=name)
    if not leaves:
        async def die() -> None:
            pass

        delivery.shards.leave = die
    task = asyncio.create_task(delivery.run())
    try:
        yield delivery
    finally:
        await cancel_until_done([task])


async def until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout:g} s"
        await asyncio.sleep(0.02)


def test_replies_whose_final_never_comes_are_forgotten(redis):
    delivery = Delivery(redis, "slack", Nowhere(), edit_interval_s=1.0, lease_s=LEASE_S)
    now = time.monotonic()
    delivery.shown = {
        "slack:abandoned": Shown(message_ids=["1"], texts=["half"], edited_at=now - ABANDONED_AFTER_S - 1),
        "slack:streaming": Shown(message_ids=["2"], texts=["still going"], edited_at=now),
    }
    delivery._forget_old()
    assert list(delivery.shown) == ["slack:streaming"]


async def test_a_restarted_adapter_reads_its_backlog_once_while_delivery_waits_on_the_platform(redis):
    """Before: 20 pending replies and a 2 s post gave 120,140 entries handed out and 6,009 XREADGROUPs in 3 s."""
    reader = ReplyReader(redis, "slack")
    await reader.ensure_groups()
    for n in range(20):
        await publish(redis, event(n))
    while await reader.read(set(range(REPLY_SHARDS)), block_ms=10):
        pass  # read by an adapter that died before delivering
    await redis.config_resetstat()
    outbox = Recording(post_delay_s=2.0)
    async with adapter_process(redis, outbox, "restarted") as delivery:
        queued = 0
        original = delivery._lane

        def counting(conversation):
            nonlocal queued
            queued += 1
            return original(conversation)

        delivery._lane = counting
        await asyncio.sleep(3)
        reads = (await redis.info("commandstats")).get("cmdstat_xreadgroup", {}).get("calls", 0)
        assert queued == 20, queued  # each pending reply queued once, none again while in flight
        # Two per shard for the backlog (a page, then the empty end), then one blocking read per lease round.
        assert reads <= 2 * REPLY_SHARDS + 3 / (LEASE_S / 3) + 2, reads
        await until(lambda: len(outbox.posted) == 20, what="20 answers shown")
    assert sorted(outbox.jobs) == sorted(f"slack:{n}" for n in range(20))


async def test_a_conversation_held_for_long_is_not_delivered_again_and_ends_with_its_answer(redis):
    """Before: an adapter adopted its own replies idle for 30 s, so a stale partial followed the final."""
    outbox = Recording(post_delay_s=LEASE_S * 4)  # a Retry-After longer than several lease rounds
    async with adapter_process(redis, outbox, "only", edit_interval_s=0.0):
        await publish(redis, event(1, "partial", "The answer is"))
        await publish(redis, event(1, "final", "The answer is 42."))
        await until(lambda: outbox.posted == ["The answer is 42."], what="the final shown")
        await asyncio.sleep(LEASE_S * 3)
        assert outbox.posted == ["The answer is 42."] and outbox.edits == 0


async def test_a_partial_that_arrives_after_its_final_is_dropped(redis):
    outbox = Recording()
    async with adapter_process(redis, outbox, "only"):
        await publish(redis, event(1, "final", "The answer is 42."))
        await until(lambda: outbox.posted == ["The answer is 42."], what="the final shown")
        await publish(redis, event(1, "partial", "The answer is"))  # a late one, from a worker that lost the job
        await publish(redis, event(2, "final", "Marker."))  # same lane order: once shown, the partial was handled
        await until(lambda: "Marker." in outbox.posted, what="the marker shown")
        assert outbox.posted == ["The answer is 42.", "Marker."] and outbox.edits == 0


async def test_two_adapter_processes_deliver_each_reply_once(redis):
    """Before: two processes of one platform shared a consumer name and posted each of 10 answers twice."""
    first, second = Recording(), Recording()
    async with adapter_process(redis, first, "first"), adapter_process(redis, second, "second"):
        await asyncio.sleep(LEASE_S)  # both registered: the shards are shared out
        for n in range(40):
            await publish(redis, event(n, "partial", f"answer {n} so"))
            await publish(redis, event(n, "final"))
        await until(lambda: len(first.posted) + len(second.posted) >= 40, what="40 answers shown")
        await asyncio.sleep(LEASE_S)
    jobs = first.jobs + second.jobs
    assert sorted(jobs) == sorted(f"slack:{n}" for n in range(40))  # each once
    assert first.jobs and second.jobs  # both did their share
    for outbox in (first, second):  # a conversation's events all went to one process
        assert all(text == f"answer {job.split(':')[1]}" for text, job in zip(outbox.posted, outbox.jobs))


async def test_replies_a_dead_process_left_are_delivered_by_another_once_its_lease_cannot_be_trusted(redis):
    doomed, survivor = Recording(post_delay_s=60), Recording()
    async with adapter_process(redis, survivor, "survivor"):
        async with adapter_process(redis, doomed, "doomed", leaves=False) as dying:
            await until(lambda: len(dying.shards.held) == REPLY_SHARDS // 2, what="the shards shared out")
            stranded = [n for n in range(40) if shard_of(f"slack:D{n}") in dying.shards.held][:3]
            for n in stranded:
                await publish(redis, event(n))
            await until(lambda: len(dying.in_flight) == 3, what="the doomed process reading them")
        died_at = time.monotonic()  # killed mid-post, its leases still on
        await until(lambda: len(survivor.posted) == 3, timeout=LEASE_S * 4, what="the stranded replies delivered")
        took = time.monotonic() - died_at
    assert sorted(survivor.jobs) == sorted(f"slack:{n}" for n in stranded)
    # Not before the lease lapsed and stayed vacant for as long as its holder would trust it (2/3 of the lease),
    # and within a round or two of that.
    assert LEASE_S * 5 / 3 - 0.2 < took < LEASE_S * 5 / 3 + 0.5, took


async def test_delivery_rides_out_a_redis_restart(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    redis = connect(server.url)
    outbox = Recording()
    try:
        async with adapter_process(redis, outbox, "only"):
            await publish(redis, event(1, text="before"))
            await until(lambda: "before" in outbox.posted, timeout=20, what="before delivered")
            server.stop()
            await asyncio.sleep(1.5)  # delivery polls a dead server meanwhile
            server.start()
            await publish(redis, event(2, text="after"))
            await until(lambda: "after" in outbox.posted, timeout=20, what="after delivered")
            assert outbox.posted == ["before", "after"]
    finally:
        await redis.aclose()
        server.stop()


async def test_a_final_equal_to_the_last_partial_is_one_more_edit_only_where_messages_settle(redis):
    for settles, edits in ((False, 0), (True, 1)):
        outbox = Recording()
        outbox.settles = settles
        delivery = Delivery(redis, "slack", outbox, edit_interval_s=0.0, lease_s=LEASE_S)
        for kind in ("partial", "final"):
            await delivery.deliver(ReplyEvent(job_id=f"slack:same-{settles}", conversation="slack:c", kind=kind, text="Hello.", reply_to={}))
        assert (outbox.posted, outbox.edits) == (["Hello."], edits)


async def test_a_full_redis_does_not_stop_delivery(redis, caplog):
    """Found with the Slack adapter: a lease renewal refused with OOM ended the whole adapter."""
    await publish(redis, event(1, text="written before Redis filled up"))
    outbox = Recording()
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", 1)  # every write that needs memory is refused from here on
    try:
        async with adapter_process(redis, outbox, "only"):
            await asyncio.sleep(LEASE_S)  # lease rounds refused meanwhile
            assert outbox.posted == []  # no lease could be taken: nothing is read, and nothing stopped
            await redis.config_set("maxmemory", 0)
            await until(lambda: outbox.posted == ["written before Redis filled up"], what="delivered once Redis has room")
    finally:
        await redis.config_set("maxmemory", 0)
    assert any("redis unavailable" in record.getMessage() for record in caplog.records)


async def test_a_reply_read_but_lost_on_the_way_is_delivered_when_the_pending_replies_are_read_again(redis, monkeypatch):
    monkeypatch.setattr("bot.delivery.REREAD_PENDING_S", 0.5)
    outbox = Recording()
    async with adapter_process(redis, outbox, "only") as delivery:
        read, dropped = delivery.reader._read, []

        async def losing_the_first_answer(streams, count, block_ms):
            entries = await read(streams, count, block_ms)
            if entries and not dropped and ">" in streams.values():
                dropped.extend(entries)  # Redis handed them out; the connection dropped the answer
                return []
            return entries

        delivery.reader._read = losing_the_first_answer
        await publish(redis, event(1, text="lost on the way"))
        await until(lambda: dropped, what="the reply read and lost")
        await until(lambda: outbox.posted == ["lost on the way"], what="the lost reply delivered")
        await asyncio.sleep(1.2)  # two more rereads: nothing shown twice
    assert outbox.posted == ["lost on the way"]


async def test_delivery_goes_on_after_redis_lost_its_data(redis):
    """Found in review: with the reply groups gone (Redis restarted without its data, or flushed),
    every read failed with NOGROUP and the adapter logged 'redis unavailable' forever."""
    outbox = Recording()
    async with adapter_process(redis, outbox, "only"):
        await publish(redis, event(1, text="before"))
        await until(lambda: outbox.posted == ["before"], what="before delivered")
        await redis.flushdb()
        await publish(redis, event(2, text="after"))
        await until(lambda: outbox.posted == ["before", "after"], what="after delivered")


class RefusingSettled(Recording):
    """Its first `failures` edits that show a final text fail, as a platform's 5xx, internal_error or timeout does."""

    def __init__(self, failures: int):
        super().__init__()
        self.failures = failures

    async def edit(self, message_id, part):
        if part.settled and self.failures:
            self.failures -= 1
            raise RuntimeError("internal_error")
        await super().edit(message_id, part)


@pytest.mark.parametrize(("failures", "shown"), [
    (1, ["The answer is 42."]),  # before: acknowledged and never shown, the message kept its partial (and Stop)
    (100, ["The answer is", FAILED]),  # the platform keeps refusing: apologised for, once
])
async def test_a_final_the_platform_fails_to_show_is_tried_again_then_apologised_for(redis, failures, shown):
    outbox = RefusingSettled(failures)
    async with adapter_process(redis, outbox, "only"):
        await publish(redis, event(1, "partial", "The answer is"))
        await until(lambda: outbox.posted == ["The answer is"], what="the partial shown")
        await publish(redis, event(1, "final", "The answer is 42."))
        await until(lambda: outbox.posted == shown, timeout=15, what="the final or the apology")
        await asyncio.sleep(LEASE_S * 2)
        assert outbox.posted == shown  # acknowledged: not tried again


async def test_a_batch_given_up_on_a_stale_looking_lease_comes_back_at_once_and_in_order(redis):
    """Before: it waited for the 60 s reread of pending replies and came after the conversation's newer replies."""
    outbox = Recording()
    async with adapter_process(redis, outbox, "only") as delivery:
        await until(lambda: delivery.shards.reading, what="shards taken")
        holds, looks_stale = delivery.shards.holds, [True]

        def holds_once_stale(shard):
            if looks_stale:  # a renewal that came late: the lease cannot be trusted for this batch
                looks_stale.pop()
                return False
            return holds(shard)

        delivery.shards.holds = holds_once_stale
        conversation = "slack:D9"
        await publish(redis, event(1, "final", "first", conversation=conversation))
        await until(lambda: not looks_stale, what="the batch given up")
        await publish(redis, event(2, "final", "second", conversation=conversation))
        await until(lambda: len(outbox.posted) == 2, timeout=5, what="both shown within seconds")
    assert outbox.posted == ["first", "second"]


async def test_after_redis_lost_its_data_two_processes_never_deliver_the_same_reply(redis):
    """Defect 10: with the shard leases gone, a process took shards another still believed it held, and
    read that one's unacknowledged replies as its own backlog: 16 of 56 answers were posted twice."""
    first, second = Recording(post_delay_s=0.2), Recording(post_delay_s=0.2)
    conversations = [f"slack:D{n}" for n in range(16)]
    lease_s = 9.0  # rounds 3 s apart: a process's belief that it holds a shard outlives the loss that long
    async with contextlib.AsyncExitStack() as processes:
        one = await processes.enter_async_context(adapter_process(redis, first, "first", lease_s=lease_s))
        await asyncio.sleep(lease_s / 6)  # their rounds half a round apart, as processes started at any time are
        other = await processes.enter_async_context(adapter_process(redis, second, "second", lease_s=lease_s))
        await until(lambda: one.shards.reading and other.shards.reading, timeout=lease_s, what="the shards shared")
        sent = 0

        async def send(rounds: int) -> None:
            nonlocal sent
            for _ in range(rounds):
                for conversation in conversations:
                    sent += 1
                    await publish(redis, event(sent, text=f"answer {sent}", conversation=conversation))
                await asyncio.sleep(0.05)

        await send(2)
        await until(lambda: len(first.posted) + len(second.posted) == sent, what="replies before the loss delivered")
        await send(1)
        await redis.flushall()  # replies read and not yet acknowledged are in flight in both processes
        lost_before = sent
        await send(4)
        after_loss = {f"answer {n}" for n in range(lost_before + 1, sent + 1)}
        await until(lambda: after_loss <= set(first.posted + second.posted), timeout=20, what="replies after the loss")
        await asyncio.sleep(lease_s)
    shown = first.posted + second.posted
    assert sorted(text for text in set(shown) if shown.count(text) > 1) == []


class SlowLine(Recording):
    """The platform creates each message as the request arrives and answers `answer_after_s` later; a
    conversation in `rate_limited_until` waits (before any request goes out) until that monotonic time."""

    def __init__(self, answer_after_s: float = 0.0):
        super().__init__()
        self.answer_after_s = answer_after_s
        self.rate_limited_until: dict[str, float] = {}

    async def post(self, part):
        await asyncio.sleep(max(0.0, self.rate_limited_until.get(part.conversation, 0.0) - time.monotonic()))
        request_sent()
        self.posted.append(part.text)
        self.jobs.append(part.job_id)
        message_id = str(len(self.posted))
        await asyncio.sleep(self.answer_after_s)
        return message_id


async def test_an_adapter_stopped_while_a_post_is_on_its_way_records_it_and_the_next_holder_edits_it(redis):
    """Defect 11: SIGTERM cancelled a post the platform had already accepted, before its id was recorded;
    the next holder of the shard posted the answer again (two messages)."""
    platform = SlowLine(answer_after_s=0.3)  # longer than the stop's repeated cancellations, within the lease
    async with adapter_process(redis, platform, "stopping"):
        await publish(redis, event(1, "partial", "The answer"))
        await until(lambda: platform.posted == ["The answer"], what="the post on its way")
    # Stopped (as SIGTERM stops it, cancelling again and again) while the platform had not answered yet: the post
    # is finished and recorded, and the shards handed over at once all the same.
    holders = {await redis.get(keys.reply_shard("slack", shard)) for shard in range(REPLY_SHARDS)}
    assert holders == {"released"}
    platform.answer_after_s = 0.0
    async with adapter_process(redis, platform, "next"):
        await publish(redis, event(1, "final", "The answer is 42."))
        await until(lambda: "The answer is 42." in platform.posted, what="the final shown")
        await asyncio.sleep(LEASE_S)
    assert platform.posted == ["The answer is 42."]


async def test_a_conversation_waiting_on_a_rate_limit_does_not_hold_up_its_shard_while_it_changes_hands(redis):
    """Defect 12: while a shard changed hands, the others of its conversations waited for the rate-limited
    one's post (7 s for an 8 s wait): the shard was given up only once everything read from it was delivered."""
    platform = SlowLine()
    on_a_handed_shard = [f"slack:D{n}" for n in range(100) if shard_of(f"slack:D{n}") == REPLY_SHARDS - 1][:2]
    waiting, other = on_a_handed_shard
    async with adapter_process(redis, platform, "first") as first:
        await until(lambda: first.shards.reading == set(range(REPLY_SHARDS)), what="every shard taken")
        platform.rate_limited_until[waiting] = time.monotonic() + 5.0
        await publish(redis, event(1, text="waits for the rate limit", conversation=waiting))
        await until(lambda: first.in_flight, what="the rate-limited reply read")
        async with adapter_process(redis, platform, "second") as second:
            await until(lambda: REPLY_SHARDS - 1 in second.shards.reading, timeout=3, what="the shard handed over")
            published_at = time.monotonic()
            await publish(redis, event(2, text="not held up", conversation=other))
            await until(lambda: "not held up" in platform.posted, timeout=3, what="the other conversation's reply")
            assert time.monotonic() - published_at < 1.0
            await until(lambda: "waits for the rate limit" in platform.posted, timeout=8, what="the rate-limited reply")
            await asyncio.sleep(LEASE_S)
    assert sorted(platform.posted) == ["not held up", "waits for the rate limit"]


async def test_a_hand_over_waiting_for_a_post_on_its_way_keeps_the_other_shards_renewed(redis):
    """Found in review: the hand-over waited for the post inside the loop that renews the leases, so every
    shard of the process went untrusted (and undelivered) while the platform took its time."""
    platform = SlowLine(answer_after_s=1.5)
    conversation = next(f"slack:D{n}" for n in range(100) if shard_of(f"slack:D{n}") == REPLY_SHARDS - 1)
    async with adapter_process(redis, platform, "first") as first:
        await until(lambda: first.shards.reading == set(range(REPLY_SHARDS)), what="every shard taken")
        await publish(redis, event(1, text="on its way", conversation=conversation))
        await until(lambda: platform.posted == ["on its way"], what="the post on its way")
        async with adapter_process(redis, platform, "second") as second:
            trusted = []
            while REPLY_SHARDS - 1 not in second.shards.held:
                trusted.append(first.shards.holds(0))  # a shard it keeps
                await asyncio.sleep(0.05)
                assert len(trusted) < 200, "the shard never handed over"
            assert all(trusted) and len(trusted) > 10, trusted
    assert platform.posted == ["on its way"]
