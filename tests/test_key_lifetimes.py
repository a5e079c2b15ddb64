"""Nothing a conversation leaves in Redis lives forever: after a session of asks, ratings and resets,
every key either expires or is one of the bounded structures the service shares."""

from __future__ import annotations

import asyncio
import json
import re

from bot.slack.dm_threads import DmThreads
from contract import history, keys
from contract.feedback import FeedbackStore
from contract.jobs import Conversation
from tests.conftest import running_worker
from tests.test_slack import DM, adapter, answer_shown, fake, send_dm, slack_settings, slash_command
from tests.test_slack_agent import feedback_click

__all__ = ["fake"]  # the fixture, shared with test_slack

# Shared by all conversations, each bounded: by trimming (streams), by pruning, or by what is in flight.
BOUNDED = [
    r"schema", r"active", r"suspects", r"pool:[a-z0-9_-]+:(?:ready|leases|queued|wake)",  # what is queued or being answered
    r"pools",  # one member per pool name
    r"replies:[a-z]+:\d+",  # trimmed below what the adapters acknowledged
    r"feedback", r"feedback:counts",  # the newest KEPT_VOTES votes; one count per rating
    r"slack:waiting",  # entries pruned once answered or after GIVE_UP_S
]


async def unbounded_keys(redis) -> list[str]:
    shared = re.compile("|".join(f"(?:{keys.PREFIX}{pattern})" for pattern in BOUNDED))
    found = []
    async for key in redis.scan_iter(match=f"{keys.PREFIX}*"):
        if not shared.fullmatch(key) and await redis.ttl(key) == -1:  # -2: expired since the scan
            found.append(f"{key} ({await redis.type(key)})")
    return sorted(found)


async def test_a_session_of_asks_ratings_and_resets_leaves_only_expiring_keys(redis, fake, tiny_engine):
    settings = slack_settings()
    async with adapter(fake, redis, settings), running_worker(redis, tiny_engine, settings):
        first = await send_dm(fake, "What is the capital of France?")
        await answer_shown(fake, redis, first.job_id, before=0)
        [buttons] = fake.messages_in(DM)[-1].feedback_buttons
        click = feedback_click(buttons["positive_button"]["value"], action_ts="1700000100.000001")
        assert (await fake.post(click, "application/x-www-form-urlencoded")).status == 200
        [vote] = await FeedbackStore(redis).recent(1)
        assert vote.question == "What is the capital of France?" and vote.answer  # copied when rated
        follow_up = await send_dm(fake, "And of Spain?", thread_ts=first.ts)
        await answer_shown(fake, redis, follow_up.job_id, before=1)
        second = await send_dm(fake, "Tell me about strawberries.")
        await answer_shown(fake, redis, second.job_id, before=2)

        reset = await fake.post(slash_command(), "application/x-www-form-urlencoded")
        assert reset.status == 200 and json.loads(reset.body)["text"].startswith("Done")
        [vote] = await FeedbackStore(redis).recent(1)
        assert (vote.rating, vote.question, vote.answer) == ("good", None, None)  # "I have forgotten our conversations"
        assert await history.load_exchanges(redis, first.conversation) == []

        again = await send_dm(fake, "Hello again.", thread_ts=first.ts)
        await answer_shown(fake, redis, again.job_id, before=3)
    assert await unbounded_keys(redis) == []


async def test_a_dm_remembers_only_the_threads_used_within_the_history_lifetime(redis):
    """Before: every thread ever started in a DM stayed in its set, and each message kept the set 90 days longer."""
    threads = DmThreads(redis, keep_s=1)
    await threads.remember(Conversation(platform="slack", channel=DM, thread="1.0"))
    await asyncio.sleep(1.1)  # its history has expired by now: nothing left to reset
    await threads.remember(Conversation(platform="slack", channel=DM, thread="2.0"))
    assert await redis.zrange(keys.slack_dm_threads(DM), 0, -1) == [f"slack:{DM}:2.0"]
    assert 0 < await redis.ttl(keys.slack_dm_threads(DM)) <= 1
    assert await threads.forget_all(DM) == 1
