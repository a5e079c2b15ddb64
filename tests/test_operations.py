"""Usage and budgets, and erasing a person: through the real worker, the tiny model, Redis and the `chatbot` commands."""

from __future__ import annotations

import pytest

from contract import history, keys
from contract.erasure import forget_user
from contract.feedback import FeedbackStore
from contract.intake import Intake
from contract.jobs import Conversation, RejectedMessage, ReplyEvent, Scope
from contract.usage import Usage, day, report
from contract.work import WorkQueue
from service.config import LimitSettings
from tests.conftest import final_event, reply_events, running_worker, tiny_settings
from tests.test_cli import chatbot

ROOM = Conversation(platform="discord", channel="c1")
GUILD = Scope(platform="discord", workspace="g1", channel="c1")


async def everything_stored(redis) -> str:
    """Every value in Redis, as text."""
    read = {"string": redis.get, "list": lambda k: redis.lrange(k, 0, -1), "hash": redis.hgetall, "set": redis.smembers,
            "zset": lambda k: redis.zrange(k, 0, -1), "stream": redis.xrange}
    return str([await read[await redis.type(key)](key) async for key in redis.scan_iter(match="*")])


async def answered(redis, intake: Intake, message_id: str, author_id: str, text: str = "Hello there") -> str:
    submitted = await intake.submit(ROOM, message_id, text, author=author_id.title(), author_id=author_id, scope=GUILD)
    assert (await final_event(redis, "discord", submitted.job_id)).kind == "final"
    return submitted.job_id


async def test_usage_is_counted_once_per_answer_by_author_conversation_and_workspace(redis, tiny_engine, settings):
    intake = Intake(redis, settings.limits)
    async with running_worker(redis, tiny_engine, settings):
        for n, author in enumerate(["alice", "alice", "bob"]):
            await answered(redis, intake, f"m{n}", author)
    by_author = {row.name: row for row in await report(redis, "author", 1)}
    assert set(by_author) == {"discord:alice", "discord:bob"}
    assert (by_author["discord:alice"].messages, by_author["discord:bob"].messages) == (2, 1)
    assert all(row.tokens_in > 0 and row.tokens_out > 0 for row in by_author.values())
    [workspace] = await report(redis, "workspace", 7)
    [conversation] = await report(redis, "conversation", 7)
    assert workspace.name == "discord:g1" and conversation.name == ROOM.key
    assert workspace.tokens_in == conversation.tokens_in == sum(row.tokens_in for row in by_author.values())
    assert workspace.messages == 3

    # A job delivered again after its answer was recorded is not counted again.
    job = (await intake.submit(ROOM, "again", "Hi", author_id="bob", scope=GUILD)).job_id
    [claim] = await WorkQueue(redis).claim("w")
    event = ReplyEvent(job_id=job, conversation=ROOM.key, kind="final", text="Hi!")
    assert await WorkQueue(redis).complete(claim.job, event, usage=Usage(10, 5))
    assert not await WorkQueue(redis).complete(claim.job, event, usage=Usage(10, 5))
    bob = {row.name: row for row in await report(redis, "author", 1)}["discord:bob"]
    assert (bob.messages, bob.tokens_in - by_author["discord:bob"].tokens_in) == (2, 10)
    assert 0 < await redis.ttl(keys.usage_day(day()) + "author:in") <= 90 * 86400


async def test_a_daily_budget_refuses_with_when_it_renews(redis, tiny_engine, settings):
    limits = LimitSettings(daily_tokens_per_author=1)
    intake = Intake(redis, limits)
    async with running_worker(redis, tiny_engine, settings):
        await answered(redis, intake, "m1", "alice")  # nothing used yet: taken
        with pytest.raises(RejectedMessage, match=r"used your 1 tokens for today\. Your budget renews at 00:00 UTC, in \d+ h"):
            await intake.submit(ROOM, "m2", "More?", author_id="alice", scope=GUILD)
        await answered(redis, intake, "m3", "bob")  # another person's budget is their own
    assert not await redis.exists(keys.job("discord:m2"))


async def test_chatbot_usage_prints_a_table(redis, redis_server, tmp_path, tiny_engine, settings):
    async with running_worker(redis, tiny_engine, settings):
        await answered(redis, Intake(redis, settings.limits), "m1", "alice")
    code, out, err = await chatbot(redis_server.url, tmp_path, "usage", "--by", "workspace", "--days", "2")
    assert code == 0, err
    header, row, total = out.splitlines()
    assert header.split()[:4] == ["workspace", "tokens", "in", "tokens"] and row.split()[0] == "discord:g1"
    assert row.split()[1:] == total.split()[1:] and row.split()[-1] == "1"
    code, _, err = await chatbot(redis_server.url, tmp_path, "usage", "--days", "0")
    assert code == 2 and "--days" in err


async def test_forget_user_removes_one_person_everywhere_and_no_one_else(redis, redis_server, tmp_path, tiny_engine, settings):
    intake = Intake(redis, settings.limits)
    async with running_worker(redis, tiny_engine, settings):
        alice_job = await answered(redis, intake, "a1", "alice", "My secret is 42.")
        bob_job = await answered(redis, intake, "b1", "bob", "What is the weather?")
        await answered(redis, intake, "a2", "alice", "Remember it.")
    feedback = FeedbackStore(redis)
    await feedback.record(alice_job, "bob", "good", ROOM.key)  # bob rates alice's answer: its copy names her question
    await feedback.record(bob_job, "alice", "bad", ROOM.key)
    await feedback.record(bob_job, "carol", "good", ROOM.key)

    alice_turns = await redis.lrange(keys.turns(ROOM.key), 0, -1)
    code, out, err = await chatbot(redis_server.url, tmp_path, "forget-user", "discord", "alice")
    assert code == 0, err
    assert "forgot discord user alice: 4 turns" in out and "1 rating(s) they gave" in out and "0 message(s)" in out

    [left] = await history.load_exchanges(redis, ROOM.key)
    assert left.user.author_id == "bob" and "weather" in left.user.text
    assert not await redis.exists(keys.feedback_exchange(alice_job)) and await redis.exists(keys.feedback_exchange(bob_job))
    assert [vote.user for vote in await feedback.recent(10)] == ["carol", "bob"]
    assert await feedback.counts() == {"good": 2, "bad": 0}
    assert [row.name for row in await report(redis, "author", 1)] == ["discord:bob"]
    assert {event.job_id for event in await reply_events(redis, "discord")} == {bob_job}
    assert "My secret" in str(alice_turns) and "My secret" not in await everything_stored(redis)
    again = await forget_user(redis, "discord", "alice")
    assert (again.turns, again.ratings_given, again.usage_days) == (0, 0, 0)


async def test_forget_user_while_a_message_of_theirs_is_queued_leaves_no_key_behind(redis, tiny_engine, settings):
    """Before: answering the queued job recreated their queued-messages counter at -1, then 0 with no expiry."""
    intake = Intake(redis, settings.limits)
    queued = await intake.submit(ROOM, "a1", "Still there?", author_id="alice", scope=GUILD)
    erased = await forget_user(redis, "discord", "alice")
    assert erased.still_queued == 1
    async with running_worker(redis, tiny_engine, settings):
        await final_event(redis, "discord", queued.job_id)
    assert not await redis.exists(keys.author("discord", "alice") + ":queued")
    await forget_user(redis, "discord", "alice")
    assert "alice" not in str([key async for key in redis.scan_iter(match="*")])


async def test_forget_user_finds_rated_copies_the_history_no_longer_holds_and_votes_past_the_streams_cap(redis, tiny_engine):
    """Before: a rated exchange trimmed from the history (or regenerated) kept its copy, and a vote older than
    the vote stream's cap kept its key."""
    settings = tiny_settings(history={"max_turns": 2})
    intake = Intake(redis, settings.limits)
    store = FeedbackStore(redis)
    async with running_worker(redis, tiny_engine, settings):
        secret = await answered(redis, intake, "a1", "alice", "My secret word is pelican.")
        await store.record(secret, "bob", "good", ROOM.key)  # copied while the exchange is in the history
        bob_job = await answered(redis, intake, "b1", "bob", "Hello")  # max_turns 2: alice's exchange is trimmed
    await store.record(bob_job, "alice", "bad", ROOM.key)  # alice's vote
    for n in range(3):
        await redis.xadd(keys.FEEDBACK, {"job": f"discord:x{n}", "user": "carol", "rating": "good", "at": "0"}, maxlen=1, approximate=False)
    assert not [v for v in await store.recent(10) if v.user == "alice"]  # her vote left the stream, its key did not
    await forget_user(redis, "discord", "alice")
    stored = await everything_stored(redis)
    assert "pelican" not in stored
    assert not await redis.exists(keys.feedback_vote(bob_job, "alice"))
    assert (await store.counts())["bad"] == 0
