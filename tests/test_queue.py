"""The Redis job queue, against a real redis-server: order, fairness, leases, exactly-once answers, resets."""

from __future__ import annotations

import asyncio

import pytest

from contract import history, keys
from contract.history import Turn
from contract.jobs import Conversation, RejectedMessage, ReplyEvent
from contract.replies import reply_stream
from service.config import LimitSettings
from tests.conftest import Queues

ALICE = Conversation(platform="local", channel="alice")
BOB = Conversation(platform="local", channel="bob")
CAROL = Conversation(platform="local", channel="carol")
DAVE = Conversation(platform="local", channel="dave")


async def claims(queue: Queues, owner: str, max_jobs: int = 1, busy: bool = False):
    """Claim as a live worker does: its liveness key set first."""
    await queue.heartbeat(owner, [])
    return await queue.claim(owner, max_jobs, busy)


async def claim(queue: Queues, owner: str, max_jobs: int = 1):
    return [claimed.job for claimed in await claims(queue, owner, max_jobs)]


def final(job, text="answer") -> ReplyEvent:
    return ReplyEvent(job_id=job.id, conversation=job.conversation, kind="final", text=text)


def exchange(text: str) -> list[Turn]:
    return [Turn(role="user", text=text, tokens=3), Turn(role="assistant", text="re: " + text, tokens=5)]


async def test_one_conversation_is_answered_in_order_one_at_a_time(redis):
    queue = Queues(redis)
    for n in range(3):
        await queue.submit(ALICE, f"m{n}", f"message {n}")
    first = await claim(queue, "w", max_jobs=3)
    assert [job.text for job in first] == ["message 0"]
    assert await claim(queue, "w", max_jobs=3) == []  # the next waits until the head is answered
    await queue.complete(first[0], final(first[0]), [], 10, 60)
    assert [job.text for job in await claim(queue, "w", max_jobs=3)] == ["message 1"]


async def test_a_long_backlog_does_not_hold_back_another_conversation(redis):
    queue = Queues(redis, limits=LimitSettings(max_queued_per_conversation=100))
    for n in range(50):
        await queue.submit(ALICE, f"a{n}", f"alice {n}")
    await queue.submit(BOB, "b0", "bob's only message")
    answered = []
    while len(answered) < 3:
        [job] = await claim(queue, "w")
        answered.append(job.text)
        await queue.complete(job, final(job), [], 10, 60)
    assert answered == ["alice 0", "bob's only message", "alice 1"]


async def test_batches_never_hold_two_jobs_of_one_conversation(redis):
    queue = Queues(redis)
    for n in range(3):
        await queue.submit(ALICE, f"a{n}", f"alice {n}")
        await queue.submit(BOB, f"b{n}", f"bob {n}")
    batch = await claim(queue, "w", max_jobs=4)
    assert sorted(job.text for job in batch) == ["alice 0", "bob 0"]


async def test_same_platform_message_is_queued_once(redis):
    queue = Queues(redis)
    first = await queue.submit(ALICE, "m1", "hello")
    again = await queue.submit(ALICE, "m1", "hello")
    assert not first.duplicate and again.duplicate
    [job] = await claim(queue, "w")
    await queue.complete(job, final(job), [], 10, 60)
    assert (await queue.submit(ALICE, "m1", "hello")).duplicate  # answered messages stay answered


async def test_position_counts_jobs_ahead_that_no_worker_has_started(redis):
    queue = Queues(redis)
    assert (await queue.submit(ALICE, "1", "x")).ahead == 0
    assert (await queue.submit(BOB, "2", "x")).ahead == 1
    assert (await queue.submit(ALICE, "3", "x")).ahead == 2
    await claim(queue, "w", max_jobs=2)  # a worker's free slots take Alice's and Bob's first messages
    assert (await queue.submit(CAROL, "4", "x")).ahead == 1  # only Alice's second waits before it


async def test_expired_lease_is_delivered_again_and_answered_once(redis):
    queue = Queues(redis, visibility_timeout_s=0.2)
    await queue.submit(ALICE, "m1", "hello")
    [taken] = await claim(queue, "dead-worker")
    assert await claim(queue, "w") == []  # still leased
    await asyncio.sleep(0.3)
    [again] = await claim(queue, "w")
    assert again.id == taken.id and again.attempts == 1  # its worker may have died of it: charged
    assert await queue.complete(again, final(again), exchange("hello"), 10, 60)
    assert not await queue.complete(taken, final(taken), exchange("hello"), 10, 60)  # the late original
    replies = await redis.xrange(reply_stream("local", ALICE.key))
    assert len(replies) == 1
    assert len(await history.load_exchanges(redis, ALICE.key)) == 1


async def test_heartbeat_keeps_a_long_job_leased(redis):
    queue = Queues(redis, visibility_timeout_s=0.3)
    await queue.submit(ALICE, "m1", "hello")
    [job] = await claim(queue, "w")
    for _ in range(3):
        await asyncio.sleep(0.15)
        await queue.heartbeat("w", [job])
    assert await claim(queue, "w") == []


async def test_a_heartbeat_with_no_job_in_flight_only_says_the_worker_is_alive(redis):
    # The worker extends leases after each step, and a step can end the last live slot.
    await Queues(redis).heartbeat("w", [])
    assert await redis.zcard(keys.leases("default")) == 0 and await redis.exists("chatbot:worker:w")


async def test_a_live_workers_jobs_are_never_taken_and_a_stopped_ones_are_taken_at_once(redis):
    queue = Queues(redis, visibility_timeout_s=600)
    await queue.submit(ALICE, "m1", "hello")
    [job] = await claim(queue, "host-1-aaaa")
    assert await claim(queue, "host-1-bbbb") == []  # same host, another process: the job is not taken over
    await queue.gone("host-1-aaaa")
    [again] = await claim(queue, "host-1-bbbb")
    assert again.id == job.id


async def test_a_silent_workers_jobs_are_taken_once_its_liveness_expires(redis):
    queue = Queues(redis, visibility_timeout_s=0.3)
    await queue.submit(ALICE, "m1", "hello")
    [job] = await claim(queue, "killed")
    assert await claim(queue, "survivor") == []
    await asyncio.sleep(0.4)
    [again] = await claim(queue, "survivor")
    assert again.id == job.id


async def test_released_job_comes_back_first_without_counting_as_an_attempt(redis):
    queue = Queues(redis)
    await queue.submit(ALICE, "a", "alice")
    await queue.submit(BOB, "b", "bob")
    [job] = await claim(queue, "w")
    await queue.release("w", [job])
    [again] = await claims(queue, "w")
    assert again.job.id == job.id and again.job.attempts == 0 and not again.suspect
    await queue.gone("w")
    [suspect] = await claims(queue, "w2")
    assert suspect.suspect and suspect.job.attempts == 1
    await queue.release("w2", [suspect.job])
    [suspect] = await claims(queue, "w2")  # still a suspect, charged for this delivery only
    assert suspect.job.id == job.id and suspect.suspect and suspect.job.attempts == 1
    await queue.release("w", [suspect.job])  # a stopping worker's hand-back of a job taken over changes nothing
    assert await redis.zscore(keys.leases("default"), job.id) is not None
    assert await redis.hget(keys.job(job.id), "attempts") == "1"


async def test_a_dead_workers_batch_comes_back_one_job_at_a_time_and_only_a_job_alone_at_a_death_is_charged(redis):
    queue = Queues(redis)
    for conversation in (ALICE, BOB, CAROL):
        await queue.submit(conversation, conversation.channel, f"{conversation.channel}'s message")
    batch = await claims(queue, "crashed", max_jobs=3)
    assert [(claimed.job.attempts, claimed.suspect) for claimed in batch] == [(0, False)] * 3  # not charged
    await queue.gone("crashed")  # as when its liveness expires
    await queue.submit(DAVE, "dave", "dave's message")
    # Any of the three may have killed the worker: all are suspects, none is charged yet.
    assert await claims(queue, "busy", max_jobs=4, busy=True) == []  # a busy worker takes nothing while one waits
    assert await redis.smembers(keys.SUSPECTS) == {claimed.job.id for claimed in batch}
    assert [await redis.hget(keys.job(claimed.job.id), "attempts") for claimed in batch] == ["0"] * 3
    served = []
    while len(served) < 3:
        [alone] = await claims(queue, "w", max_jobs=4)  # an idle worker takes one suspect, and it alone
        assert alone.suspect and alone.job.attempts == 1
        if not served:  # its worker dies too while serving it alone: only this one is charged again
            await queue.gone("w")
            [again] = await claims(queue, "w2", max_jobs=4)
            assert again.job.id == alone.job.id and again.job.attempts == 2
        await queue.complete(alone.job, final(alone.job), [], 10, 60)
        served.append(alone.job.id)
    assert sorted(served) == sorted(claimed.job.id for claimed in batch)
    assert not await redis.exists(keys.SUSPECTS)
    [dave] = await claims(queue, "w", max_jobs=4, busy=True)
    assert dave.job.conversation == DAVE.key and dave.job.attempts == 0 and not dave.suspect


async def test_reset_is_ordered_with_messages(redis):
    queue = Queues(redis)
    await queue.submit(ALICE, "before", "sent before the reset")
    [job] = await claim(queue, "w")
    await history.reset(redis, ALICE.key)
    await queue.submit(ALICE, "after", "sent after the reset")
    # The reply to the earlier message is delivered, but its turns do not come back.
    assert await queue.complete(job, final(job), exchange(job.text), 10, 60)
    assert await history.load_exchanges(redis, ALICE.key) == []
    [later] = await claim(queue, "w")
    assert later.epoch == job.epoch + 1
    await queue.complete(later, final(later), exchange(later.text), 10, 60)
    [kept] = await history.load_exchanges(redis, ALICE.key)
    assert kept.user.text == "sent after the reset"


async def test_a_claim_carries_the_conversations_history(redis):
    queue = Queues(redis)
    await queue.submit(ALICE, "m1", "first")
    [first] = await queue.claim("w")
    assert first.history == []
    await queue.complete(first.job, final(first.job), exchange("first"), 10, 60)
    await queue.submit(ALICE, "m2", "second")
    [second] = await queue.claim("w")
    assert [(e.user.text, e.assistant.text) for e in second.history] == [("first", "re: first")]


async def test_history_is_bounded_by_turns_and_ttl(redis):
    queue = Queues(redis)
    for n in range(5):
        await queue.submit(ALICE, f"m{n}", f"message {n}")
        [job] = await claim(queue, "w")
        await queue.complete(job, final(job), exchange(job.text), 4, 60)
    kept = await history.load_exchanges(redis, ALICE.key)
    assert [e.user.text for e in kept] == ["message 3", "message 4"]
    assert 0 < await redis.ttl(keys.turns(ALICE.key)) <= 60


@pytest.mark.parametrize("text", ["", "   \n\t ", "\u200b\u200b", "\u2060 \ufeff\u200d", "\u200e\x00"])
async def test_empty_messages_are_refused_with_a_sentence(redis, text):
    with pytest.raises(RejectedMessage, match="empty"):
        await Queues(redis).submit(ALICE, "m", text)
    assert await claim(Queues(redis), "w") == []


async def test_lone_surrogates_are_replaced_not_fatal(redis):
    queue = Queues(redis)
    await queue.submit(ALICE, "m", "broken \ud800 text")
    [job] = await claim(queue, "w")
    assert job.text == "broken ? text"


async def test_a_conversation_holds_at_most_its_limit_of_waiting_messages(redis):
    queue = Queues(redis, limits=LimitSettings(max_queued_per_conversation=2))
    await queue.submit(ALICE, "1", "one")
    await queue.submit(ALICE, "2", "two")
    with pytest.raises(RejectedMessage, match="This conversation already has 2 messages waiting"):
        await queue.submit(ALICE, "3", "three")
    assert await redis.llen("chatbot:conv:local:alice:jobs") == 2 and not await redis.exists("chatbot:job:local:3")
    [job] = await claim(queue, "w")
    await queue.complete(job, final(job), [], 10, 60)
    await queue.submit(ALICE, "3", "three")  # room again once one is answered


async def test_one_person_cannot_fill_the_queue_by_opening_many_conversations(redis):
    queue = Queues(redis, limits=LimitSettings(max_queued_per_author=3))
    for n in range(3):
        await queue.submit(Conversation(platform="slack", channel="C1", thread=f"t{n}"), f"m{n}", "hi", author_id="U1")
    with pytest.raises(RejectedMessage, match="You already have 3 messages waiting"):
        await queue.submit(Conversation(platform="slack", channel="C1", thread="t9"), "m9", "hi", author_id="U1")
    await queue.submit(Conversation(platform="slack", channel="C1", thread="t9"), "other", "hi", author_id="U2")
    [job] = await claim(queue, "w")
    await queue.complete(job, final(job), [], 10, 60)
    await queue.complete(job, final(job), [], 10, 60)  # a redelivered answer does not free a second place
    await queue.submit(Conversation(platform="slack", channel="C1", thread="t9"), "m9", "hi", author_id="U1")
    with pytest.raises(RejectedMessage, match="You already have 3"):
        await queue.submit(Conversation(platform="slack", channel="C1", thread="t10"), "m10", "hi", author_id="U1")


async def test_a_person_sending_too_fast_is_told_to_wait(redis):
    queue = Queues(redis, limits=LimitSettings(messages_per_minute_per_author=3, max_queued_per_author=100))
    for n in range(3):
        await queue.submit(Conversation(platform="discord", channel=f"c{n}"), f"m{n}", "hi", author_id="42")
    with pytest.raises(RejectedMessage, match="faster than 3 a minute"):
        await queue.submit(Conversation(platform="discord", channel="c9"), "m9", "hi", author_id="42")
    assert 55 <= await redis.ttl("chatbot:author:discord:42:minute") <= 60


async def test_a_message_over_the_size_limit_is_refused_before_redis(redis):
    queue = Queues(redis, limits=LimitSettings(max_message_chars=1000))
    with pytest.raises(RejectedMessage, match="Your message is 1,001 characters long; the limit is 1,000."):
        await queue.submit(ALICE, "big", "x" * 1001)
    assert await redis.dbsize() == 0


async def served_by(queue: Queues, owner: str, conversation: Conversation, message_id: str) -> None:
    """`owner`, a worker with a prefix cache, answers one message of the conversation."""
    await queue.submit(conversation, message_id, "hello")
    await queue.heartbeat(owner, [])
    [claimed] = await queue.claim(owner, keeps_context=True)
    await queue.complete(claimed.job, final(claimed.job), exchange("hello"), 10, 60)


async def test_a_follow_up_waits_a_moment_for_the_live_worker_that_holds_its_context(redis):
    queue = Queues(redis, affinity_wait_s=5)
    await served_by(queue, "a", ALICE, "m0")
    await queue.submit(ALICE, "m1", "and then?")
    await queue.submit(BOB, "b0", "hi")
    assert await redis.llen(keys.wake_worker("a")) == 1  # a, idle, is woken for its conversation
    await queue.heartbeat("b", [])
    assert [c.job.id for c in await queue.claim("b", 2, keeps_context=True)] == ["local:b0"]
    assert await redis.lrange(keys.ready("default"), 0, -1) == [ALICE.key]  # passed over, still first in line
    assert [c.job.id for c in await queue.claim("a", 2, keeps_context=True)] == ["local:m1"]


async def test_the_preference_lapses_and_never_outlives_its_worker(redis):
    queue = Queues(redis, affinity_wait_s=0.3)
    await served_by(queue, "a", ALICE, "m0")
    await served_by(queue, "a", BOB, "b0")
    await queue.submit(ALICE, "m1", "and then?")
    await queue.submit(BOB, "b1", "and then?")
    await queue.heartbeat("b", [])
    assert await queue.claim("b", 2) == []
    await asyncio.sleep(0.35)  # a is alive but did not come for them: anyone may take them now, in order
    assert [c.job.id for c in await queue.claim("b", 1)] == ["local:m1"]
    await queue.gone("a")  # a stopped: nothing waits for it
    await queue.submit(CAROL, "c0", "hi")
    assert [c.job.id for c in await queue.claim("b", 2)] == ["local:b1", "local:c0"]


async def test_without_a_prefix_cache_no_preference_is_recorded(redis):
    queue = Queues(redis, affinity_wait_s=5)
    await queue.submit(ALICE, "m0", "hello")
    [first] = await claims(queue, "a")
    await queue.complete(first.job, final(first.job), exchange("hello"), 10, 60)
    await queue.submit(ALICE, "m1", "and then?")
    assert [job.id for job in await claim(queue, "b")] == ["local:m1"]
