"""Slack's AI-app surface end to end, offline: native streams and their fallback, suggested prompts,
feedback, and the rate budgets, through the real adapter against the fake Slack and real Redis."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from urllib.parse import urlencode

from bot.slack.budget import BURST_MINUTES
from bot.slack.outbox import FEEDBACK_ACTION
from contract.feedback import FeedbackStore
from contract.jobs import ReplyEvent
from service.config import LimitSettings
from service.slack_settings import SLACK_RATE_LIMITS, SlackSettings
from tests.conftest import running_worker
from tests.fakes.slack_server import APP_ID, TEAM_ID
from tests.test_cli import chatbot
from tests.test_slack import (
    ALICE,
    DM,
    adapter,
    answer_shown,
    fake,
    new_ts,
    publish,
    send_dm,
    send_event,
    slack_settings,
)

__all__ = ["fake"]  # the fixture, shared with test_slack


def thread_reply(thread: str, channel: str = DM, team: str = TEAM_ID) -> dict[str, str]:
    return {"channel": channel, "thread_ts": thread, "team": team, "user": ALICE}


def reply(job: str, kind: str, text: str, reply_to: dict[str, str]) -> ReplyEvent:
    conversation = f"slack:{reply_to['channel']}:{reply_to['thread_ts']}"
    return ReplyEvent(job_id=f"slack:{job}", conversation=conversation, kind=kind, text=text, reply_to=reply_to)


async def stream_words(redis, job: str, reply_to: dict[str, str], words: int, every_s: float) -> str:
    """Publish a reply as the worker streams it: growing partials, then the final text."""
    text = ""
    for index in range(words):
        text += f" word{index}"
        await publish(redis, reply(job, "partial", text.strip(), reply_to))
        await asyncio.sleep(every_s)
    text = text.strip() + " The end."
    await publish(redis, reply(job, "final", text, reply_to))
    return text


async def test_an_answer_streams_natively_start_appends_stop_with_feedback(redis, fake):
    settings = slack_settings(stream_buffer_chars=1, edit_interval_s=0.5)
    thread = new_ts()
    async with adapter(fake, redis, settings):
        text = await stream_words(redis, "streamed", thread_reply(thread), words=30, every_s=0.06)
        await fake.wait_for(lambda: [m.text for m in fake.messages_in(DM)] == [text])
    [message] = fake.messages_in(DM)
    [start], appends, [stop] = (fake.calls_to(method) for method in ("chat.startStream", "chat.appendStream", "chat.stopStream"))
    assert start.body["thread_ts"] == thread and len(appends) >= 2
    assert all(call.body["ts"] == message.ts for call in appends + [stop])
    assert stop.body["blocks"][0]["elements"][0]["type"] == "feedback_buttons" and not message.streaming
    assert fake.calls_to("chat.update") == fake.calls_to("chat.postMessage") == []
    gaps = [later - earlier for earlier, later in itertools.pairwise(message.writes)]
    assert all(gap >= 0.5 - 0.02 for gap in gaps)  # streamed text too: at most one call per message per interval


async def test_a_stream_that_expires_mid_answer_falls_back_to_chat_update(redis, fake, caplog):
    settings = slack_settings(stream_buffer_chars=1, edit_interval_s=0.5)
    fake.expire_after_appends = 1
    thread = new_ts()
    async with adapter(fake, redis, settings):
        text = await stream_words(redis, "expiring", thread_reply(thread), words=30, every_s=0.06)
        await fake.wait_for(lambda: [m.text for m in fake.messages_in(DM)] == [text])
    [message] = fake.messages_in(DM)  # the whole answer, once, in the message the stream began
    assert message.thread_ts == thread and message.feedback_buttons
    assert [call.body["ts"] for call in fake.calls_to("chat.update")][-1] == message.ts
    [refused] = [call for call in fake.calls_to("chat.appendStream") if call.at > fake.calls_to("chat.appendStream")[0].at]
    assert refused.at < fake.calls_to("chat.update")[0].at
    assert [r.error for r in caplog.records if r.getMessage().startswith("slack streaming failed")] == ["message_not_in_streaming_state"]


async def test_a_workspace_without_streaming_gets_post_and_update_and_is_not_asked_again(redis, fake):
    settings = slack_settings(stream_buffer_chars=1)
    fake.refuse_method("chat.startStream", "feature_not_enabled")
    first, second = new_ts(), new_ts()
    async with adapter(fake, redis, settings):
        for job, thread in (("first", first), ("second", second)):
            text = await stream_words(redis, job, thread_reply(thread), words=5, every_s=0.05)
            await fake.wait_for(lambda text=text: text in [m.text for m in fake.messages_in(DM)])
    assert len(fake.calls_to("chat.startStream")) == 1
    assert [m.thread_ts for m in fake.messages_in(DM)] == [first, second]


async def test_suggested_prompts_when_the_messages_tab_opens(redis, fake):
    settings = slack_settings()
    opened = {"type": "app_home_opened", "user": ALICE, "channel": DM, "tab": "messages", "event_ts": new_ts()}
    home = {**opened, "tab": "home", "event_ts": new_ts()}
    async with adapter(fake, redis, settings):
        for event in (home, opened):
            await send_event(fake, event)
        await fake.wait_for(lambda: fake.suggested)
    [suggested] = fake.suggested
    assert suggested["channel_id"] == DM and suggested["title"] == SlackSettings().prompts_title
    assert suggested["prompts"] == [prompt.model_dump() for prompt in SlackSettings().suggested_prompts]
    assert len(fake.calls_to("assistant.threads.setSuggestedPrompts")) == 1  # not for the Home tab


def feedback_click(value: str, action_ts: str) -> str:
    """The block_actions request Slack POSTs when a feedback button (with that value) is clicked."""
    return urlencode({"payload": json.dumps(feedback_payload(value, action_ts))})


def feedback_payload(value: str, action_ts: str) -> dict:
    return {
        "type": "block_actions", "api_app_id": APP_ID, "token": "legacy-verification-token",
        "team": {"id": TEAM_ID, "domain": "fake"}, "user": {"id": ALICE, "username": "alice", "team_id": TEAM_ID},
        "channel": {"id": DM, "name": "directmessage"}, "trigger_id": "1.2.3",
        "container": {"type": "message", "message_ts": "1700000001.000001", "channel_id": DM, "is_ephemeral": False},
        "actions": [{
            "type": "feedback_buttons", "action_id": FEEDBACK_ACTION, "block_id": "feedback",
            "value": value, "action_ts": action_ts,
        }],
    }


async def test_a_feedback_click_is_stored_once_and_listed_with_question_and_answer(redis, redis_server, fake, tiny_engine, tmp_path):
    settings = slack_settings()
    async with adapter(fake, redis, settings), running_worker(redis, tiny_engine, settings):
        sent = await send_dm(fake, "What is the capital of France?")
        final = await answer_shown(fake, redis, sent.job_id, before=0)
        [buttons] = fake.messages_in(DM)[-1].feedback_buttons
        click = feedback_click(buttons["positive_button"]["value"], action_ts="1700000100.000001")
        answers = [await fake.post(click, "application/x-www-form-urlencoded") for _ in range(2)]  # sent twice
        assert [answer.status for answer in answers] == [200, 200] and all(answer.seconds < 3 for answer in answers)
        [vote] = await FeedbackStore(redis).recent(10)
        assert (vote.job_id, vote.user, vote.rating) == (sent.job_id, ALICE, "good")
        assert (vote.question, vote.answer, vote.conversation) == ("What is the capital of France?", final.text, sent.conversation)
        assert await FeedbackStore(redis).counts() == {"good": 1, "bad": 0}
        # A changed mind replaces the rating rather than adding one.
        changed = feedback_click(buttons["negative_button"]["value"], action_ts="1700000200.000001")
        assert (await fake.post(changed, "application/x-www-form-urlencoded")).status == 200
    assert await FeedbackStore(redis).counts() == {"good": 0, "bad": 1}
    assert [vote.rating for vote in await FeedbackStore(redis).recent(10)] == ["bad", "good"]

    code, out, err = await chatbot(redis_server.url, tmp_path, "feedback", "--limit", "5")
    assert code == 0, err
    assert "0 good, 1 bad" in out and "BAD" in out and "GOOD" in out and "What is the capital of France?" in out
    assert " ".join(final.text.split())[:50] in out


async def test_ten_answers_at_once_keep_within_the_workspace_budget(redis, fake):
    rates = {"chat.startStream": 24, "chat.appendStream": 48, "chat.stopStream": 24}  # per minute, scaled down
    settings = slack_settings(stream_buffer_chars=1, edit_interval_s=0.5, rate_limits=rates)
    threads = [new_ts() for _ in range(10)]
    async with adapter(fake, redis, settings):
        texts = await asyncio.gather(*(
            stream_words(redis, f"busy{index}", thread_reply(thread), words=25, every_s=0.1) for index, thread in enumerate(threads)
        ))
        await fake.wait_for(lambda: sorted(m.text for m in fake.messages_in(DM)) == sorted(texts), timeout=60)
    for method, per_minute in rates.items():
        assert_within_budget(fake, method, per_minute)


def assert_within_budget(fake, method: str, per_minute: float) -> None:
    """The calls of `method` so far never exceed a full bucket plus its refill (bot/slack/budget.py)."""
    times = [call.at for call in fake.calls_to(method)]
    capacity, per_second = max(1.0, per_minute * BURST_MINUTES), per_minute / 60
    for index, at in enumerate(times):
        assert index + 1 <= capacity + per_second * (at - times[0]) + 1, (method, index, at - times[0])


async def test_messages_tab_opens_and_new_threads_keep_within_the_workspace_budget(redis, fake, caplog):
    caplog.set_level(logging.INFO, logger="bot.slack.handlers")
    rates = {"assistant.threads.setTitle": 8, "assistant.threads.setSuggestedPrompts": 8}  # per minute: buckets of 2
    settings = slack_settings(rate_limits=rates).model_copy(update={"limits": LimitSettings(max_queued_per_author=20)})
    people = [ALICE] * 10 + [f"U{n}PERSON" for n in range(5)]  # Alice opens the Messages tab ten times

    def skipped(what: str) -> int:
        return len([r for r in caplog.records if r.getMessage() == "slack call skipped" and r.what == what])

    def prompts_calls() -> int:
        return len(fake.calls_to("assistant.threads.setSuggestedPrompts"))

    async with adapter(fake, redis, settings):  # no worker: the messages wait
        for person in people:
            opened = {"type": "app_home_opened", "user": person, "channel": f"D{person}", "tab": "messages", "event_ts": new_ts()}
            await send_event(fake, opened)
        for n in range(10):
            await send_dm(fake, f"Question {n}")  # each a new thread, titled
        await fake.wait_for(lambda: prompts_calls() + skipped("suggested prompts") >= 1 + 5)
        await fake.wait_for(lambda: len(fake.calls_to("assistant.threads.setTitle")) + skipped("title") >= 10)
    opened_for = [call.body["channel_id"] for call in fake.calls_to("assistant.threads.setSuggestedPrompts")]
    assert opened_for.count(f"D{ALICE}") == 1  # once per person, however often the tab is opened
    for method, per_minute in rates.items():
        assert_within_budget(fake, method, per_minute)
    assert 2 <= len(fake.calls_to("assistant.threads.setTitle")) < 10  # a full bucket's worth: the rest skipped


async def test_a_throttled_workspace_does_not_delay_another(redis, fake):
    settings = slack_settings()
    other_dm, other_team = "D0OTHER", "T0OTHER"
    fake.channel_teams[other_dm] = other_team
    fake.throttle(4, team=TEAM_ID)
    slow, quick = thread_reply(new_ts()), thread_reply(new_ts(), channel=other_dm, team=other_team)
    async with adapter(fake, redis, settings):
        started = time.monotonic()
        await publish(redis, reply("slow", "final", "Held back by Slack.", slow))
        await publish(redis, reply("quick", "final", "Not held back.", quick))
        await fake.wait_for(lambda: [m.text for m in fake.messages_in(other_dm)] == ["Not held back."])
        quick_s = time.monotonic() - started
        await fake.wait_for(lambda: [m.text for m in fake.messages_in(DM)] == ["Held back by Slack."])
        slow_s = time.monotonic() - started
    assert quick_s < 2 and slow_s >= 3
    refused = [call for call in fake.calls if call.body.get("channel") == DM]
    assert len(refused) <= 3  # the 429 paused the workspace's calls instead of retrying them in a loop


def test_rate_limits_default_to_slacks_tiers_and_take_overrides():
    assert SlackSettings().rate_limits == SLACK_RATE_LIMITS
    assert SlackSettings(rate_limits={"chat.update": 100}).rate_limits["chat.update"] == 100
    assert SlackSettings(rate_limits={"chat.update": 100}).rate_limits["chat.stopStream"] == 20


async def test_status_shows_the_queue_position_and_is_kept_until_the_answer_begins(redis, fake):
    settings = slack_settings(status_refresh_s=1)  # Slack drops a status after 2 minutes; 1 s here
    async with adapter(fake, redis, settings):  # no worker: the messages wait
        first = await send_dm(fake, "First question")
        second = await send_dm(fake, "Second question")

        def statuses(sent) -> list[tuple[float, str]]:
            return [(call.at, call.body["status"]) for call in fake.calls_to("assistant.threads.setStatus") if call.body["thread_ts"] == sent.ts]

        await fake.wait_for(lambda: len(statuses(first)) >= 3)
        assert statuses(second)[0][1] == f"{SlackSettings().status} (1 ahead of you)"
        assert {status for _, status in statuses(first)} == {SlackSettings().status}
        await publish(redis, reply(first.job_id.removeprefix("slack:"), "final", "The first answer.", thread_reply(first.ts)))
        await fake.wait_for(lambda: fake.status_now[(DM, first.ts)] == "")
        answered_at = time.monotonic()
        # Refresh rounds go on for the second message; once two more came, one would have met the first.
        await fake.wait_for(lambda: len([at for at, _ in statuses(second) if at > answered_at]) >= 2)
    assert [at for at, _ in statuses(first) if at > answered_at] == []
    assert fake.status_now[(DM, second.ts)] == SlackSettings().status


async def test_a_status_that_lands_after_the_answer_began_is_cleared(redis, fake):
    settings = slack_settings()
    fake.delay("assistant.threads.setStatus", 2.0)  # the status is still on its way when the answer starts
    async with adapter(fake, redis, settings):
        sent = await send_dm(fake, "Quick question")
        await fake.wait_for(lambda: fake.calls_to("assistant.threads.setStatus"))
        await publish(redis, reply(sent.job_id.removeprefix("slack:"), "final", "Quick answer.", thread_reply(sent.ts)))
        await fake.wait_for(lambda: [m.text for m in fake.messages_in(DM)] == ["Quick answer."])
        await fake.wait_for(lambda: len(fake.statuses) == 2, timeout=10)
    assert [status for _, _, status in fake.statuses] == [SlackSettings().status, ""]
    assert fake.status_now[(DM, sent.ts)] == ""


async def test_a_channel_over_its_post_limit_does_not_delay_another_channel(redis, fake):
    settings = slack_settings(streaming=False)
    busy, calm = thread_reply(new_ts()), thread_reply(new_ts(), channel="D0CALM")
    fake.throttle(4, channel=DM, method="chat.postMessage")  # chat.postMessage is limited per channel
    async with adapter(fake, redis, settings):
        started = time.monotonic()
        await publish(redis, reply("busy", "final", "Posted when the channel may.", busy))
        await publish(redis, reply("calm", "final", "Posted at once.", calm))
        await fake.wait_for(lambda: [m.text for m in fake.messages_in("D0CALM")] == ["Posted at once."])
        calm_s = time.monotonic() - started
        await fake.wait_for(lambda: [m.text for m in fake.messages_in(DM)] == ["Posted when the channel may."])
        busy_s = time.monotonic() - started
    assert calm_s < 2 and busy_s >= 3


async def test_a_feedback_click_over_socket_mode_is_acknowledged_and_stored(redis, fake):
    settings = slack_settings(mode="socket")
    async with adapter(fake, redis, settings):
        envelope = await fake.send_envelope("interactive", feedback_payload("bad slack:D0DM-1", "1700000300.000001"))
        await fake.wait_for(lambda: fake.ack_of(envelope))  # acknowledged once the click is stored
    [vote] = await FeedbackStore(redis).recent(10)
    assert (vote.job_id, vote.rating, vote.user) == ("slack:D0DM-1", "bad", ALICE)


async def test_a_reply_that_ends_shorter_than_its_partials_leaves_no_stale_messages(redis, fake):
    settings = slack_settings(stream_buffer_chars=1)
    thread = new_ts()
    long_partial = " ".join(f"word{n}" for n in range(900))  # about 7,000 characters: two messages
    async with adapter(fake, redis, settings):
        await publish(redis, reply("cut", "partial", long_partial, thread_reply(thread)))
        await fake.wait_for(lambda: len(fake.messages_in(DM)) == 2)
        await publish(redis, reply("cut", "error", "Sorry, the answer failed.", thread_reply(thread)))
        await fake.wait_for(lambda: [m.text for m in fake.messages_in(DM)] == ["Sorry, the answer failed."])
    [deleted] = fake.calls_to("chat.delete")
    assert deleted.body["channel"] == DM
