"""The Slack adapter end to end, offline: bolt's real HTTP and Socket Mode adapters, a fake Slack
(tests/fakes/slack_server.py) over real sockets, real Redis, the real worker with the tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import aiohttp
import pytest
import yaml
from aiohttp import web
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier

from bot.attachments_text import CUT_NOTICE
from bot.slack.app import build_app, receiving, run_slack, serve, slack_tokens, web_client
from bot.slack.files import NOT_READABLE
from bot.slack.handlers import RESET_DONE, RESET_IN_CHANNEL
from bot.slack.messages import from_slack
from bot.slack.outbox import LIMIT
from contract import history, keys
from contract.jobs import EMPTY_MESSAGE, UNAVAILABLE, Job, ReplyEvent
from contract.replies import reply_stream
from service.config import ConfigError, LimitSettings, Secrets, Settings
from service.redis_client import connect
from service.redis_server import free_port
from service.slack_settings import SlackSettings
from service.tasks import cancel_until_done
from tests.conftest import final_event, reply_events, running_worker, shards_held, tiny_settings
from tests.fakes.local_server import serve_locally, shut_down
from tests.fakes.slack_server import APP_ID, BOT_ID, BOT_USER_ID, SOCKET_PATH, TEAM_ID, Answer, FakeSlack

ROOT = Path(__file__).resolve().parents[1]
SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
SECRETS = Secrets(
    values={"SLACK_BOT_TOKEN": "xoxb-test-token", "SLACK_APP_TOKEN": "xapp-test-token", "SLACK_SIGNING_SECRET": SIGNING_SECRET}
)
DM = "D0DM"
CHANNEL = "C0GENERAL"
ALICE = "U1ALICE"
# Replies the tests publish themselves, as a worker would, into a DM thread's conversation.
DM_CONVERSATION = f"slack:{DM}:1690000000.000000"
COLOUR_CONVERSATION = [
    "My favorite color is blue. My favorite fruit is strawberry.",
    "Name a fruit that is on my favorite colour.",
    "What is the colour of my favorite fruit ?",
]
_ts = itertools.count(1)


def slack_settings(**slack) -> Settings:
    return tiny_settings(slack={"mode": "http", "http_port": free_port(), "edit_interval_s": 0.5, **slack})


def new_ts() -> str:
    number = next(_ts)
    return f"{1_690_000_000 + number}.{number:06d}"


# --- the adapter and what Slack sends it ------------------------------------------------------


@pytest.fixture
async def fake():
    # Slack retries a failed event after a minute and after five: here at once, so a test hears them.
    fake = await FakeSlack(signing_secret=SIGNING_SECRET, retry_delays_s=(0.0, 0.2, 0.5)).start()
    yield fake
    await fake.stop()


@contextlib.asynccontextmanager
async def adapter(fake: FakeSlack, redis, settings: Settings, delivering: bool = True, redis_down: bool = False):
    """The real adapter (`serve`), its Web API client pointed at the fake, until the block ends, from when its
    delivery holds the reply shards (unless Redis is down); without `delivering`, only its listeners: bolt
    receiving Slack's requests."""
    client = web_client(SECRETS.get("SLACK_BOT_TOKEN"), base_url=fake.api_url)
    bot = build_app(settings, SECRETS, redis, client=client)
    connections = fake.connections
    fake.request_url = f"http://127.0.0.1:{settings.slack.http_port}/slack/events"
    task = asyncio.create_task(serve(bot, settings, SECRETS, redis) if delivering else listening(bot.app, settings))

    async def ready() -> bool:
        if task.done():
            task.result()  # the adapter failed: show why
        if settings.slack.mode == "socket":
            return fake.connections > connections
        with contextlib.suppress(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{settings.slack.http_port}/healthz") as response:
                    return response.status == 200
        return False

    try:
        deadline = time.monotonic() + 10
        while not await ready():
            assert time.monotonic() < deadline, "the adapter did not start"
            await asyncio.sleep(0.02)
        if delivering and not redis_down:
            await shards_held(redis, "slack")
        yield bot
    finally:
        await cancel(task)


async def listening(app, settings: Settings) -> None:
    async with receiving(app, settings, slack_tokens(settings, SECRETS)):
        await asyncio.Event().wait()  # until cancelled


async def cancel(task: asyncio.Task) -> None:
    await cancel_until_done([task])
    if not task.cancelled():
        task.result()  # the adapter stopped on its own: show why


async def send_event(fake: FakeSlack, event: dict) -> Answer:
    """Deliver an event over HTTP as Slack does; the app acknowledges it the first time."""
    [answer] = await fake.deliver(event_callback(event))
    assert answer.status == 200, answer.body
    return answer


async def adapter_health(settings: Settings) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{settings.slack.http_port}/healthz") as response:
            return response.status


def event_callback(event: dict) -> dict:
    return {
        "token": "legacy-verification-token",
        "team_id": TEAM_ID,
        "api_app_id": APP_ID,
        "type": "event_callback",
        "event_id": f"Ev{uuid.uuid4().hex[:10].upper()}",
        "event_time": int(time.time()),
        "authorizations": [{"team_id": TEAM_ID, "user_id": BOT_USER_ID, "is_bot": True}],
        "event": event,
    }


def dm(text: str, **fields) -> dict:
    ts = new_ts()
    return {"type": "message", "channel": DM, "channel_type": "im", "user": ALICE, "text": text, "ts": ts, "event_ts": ts, **fields}


def slash_command(
    channel: str = DM, channel_name: str = "directmessage", command: str = "/reset", text: str = "", user: str = ALICE
) -> str:
    return urlencode({
        "token": "legacy-verification-token", "team_id": TEAM_ID, "team_domain": "fake", "channel_id": channel,
        "channel_name": channel_name, "user_id": user, "user_name": user.lower(), "command": command, "text": text,
        "api_app_id": APP_ID, "response_url": "https://hooks.slack.test/commands/1", "trigger_id": "13345224609.738474920.8088930838d88f008e0",
    })


@dataclass(frozen=True)
class Sent:
    job_id: str
    ts: str  # the message's own ts
    thread: str  # the thread it starts or is in

    @property
    def conversation(self) -> str:
        return f"slack:{DM}:{self.thread}"


async def send_dm(fake: FakeSlack, text: str, **fields) -> Sent:
    """Deliver a DM over HTTP; says which job it should create, in which thread."""
    event = dm(text, **fields)
    await send_event(fake, event)
    return Sent(f"slack:{DM}-{event['ts']}", event["ts"], event.get("thread_ts") or event["ts"])


async def publish(redis, event: ReplyEvent) -> None:
    """A reply event as the worker publishes it."""
    await redis.xadd(reply_stream("slack", event.conversation), {"event": event.model_dump_json()})


async def answer_shown(fake: FakeSlack, redis, job_id: str, before: int, channel: str = DM) -> ReplyEvent:
    """Wait for the job's final reply, then for Slack to show it as the one new message."""
    final = await final_event(redis, "slack", job_id)
    await fake.wait_for(lambda: [m.text for m in fake.messages_in(channel)[before:]] == [final.text])
    return final


async def job_keys(redis) -> list[str]:
    return sorted(await redis.keys("chatbot:job:*"))


# --- tests ------------------------------------------------------------------------------------


async def test_dm_gets_status_title_and_a_native_stream_with_feedback_in_its_thread(redis, fake, tiny_engine):
    settings = slack_settings()
    async with adapter(fake, redis, settings), running_worker(redis, tiny_engine, settings):
        sent = await send_dm(fake, "Hello there, who are you?")
        final = await answer_shown(fake, redis, sent.job_id, before=0)
        assert fake.status_now[(DM, sent.ts)] == ""  # cleared by the answer
    assert final.kind == "final" and final.conversation == sent.conversation == f"slack:{DM}:{sent.ts}"
    [status] = fake.calls_to("assistant.threads.setStatus")
    assert (status.body["thread_ts"], status.body["status"]) == (sent.ts, SlackSettings().status)
    assert status.body["loading_messages"] == SlackSettings().loading_messages
    assert fake.titles == {(DM, sent.ts): "Hello there, who are you?"}
    [start] = fake.calls_to("chat.startStream")
    assert (start.body["channel"], start.body["thread_ts"]) == (DM, sent.ts) and start.at > status.at
    [stop] = fake.calls_to("chat.stopStream")
    [message] = fake.messages_in(DM)
    assert message.thread_ts == sent.ts and message.text == final.text and not message.streaming
    assert [button["positive_button"]["value"] for button in message.feedback_buttons] == [f"good {sent.job_id} {sent.conversation}"]
    assert fake.calls_to("chat.postMessage") == fake.calls_to("chat.update") == []
    assert {call.token for call in fake.calls} == {"xoxb-test-token"}
    [exchange] = await history.load_exchanges(redis, sent.conversation)
    assert exchange.user.text == "Hello there, who are you?" and exchange.user.name is None


async def test_unsigned_forged_and_stale_requests_are_refused(redis, fake):
    settings = slack_settings()
    body = json.dumps(event_callback(dm("Hello")))
    async with adapter(fake, redis, settings):
        forged = await fake.post(body, secret="not-the-signing-secret")
        stale = await fake.post(body, timestamp=int(time.time()) - 6 * 60)
        async with aiohttp.ClientSession() as session:
            async with session.post(fake.request_url, data=body, headers={"Content-Type": "application/json"}) as response:
                unsigned = response.status
        challenge = await fake.post(json.dumps({"type": "url_verification", "challenge": "c-42", "token": "x"}))
    assert (forged.status, stale.status, unsigned) == (401, 401, 401)
    assert await job_keys(redis) == []
    assert challenge.status == 200 and json.loads(challenge.body)["challenge"] == "c-42"


async def test_malformed_requests_get_400_or_401_without_a_traceback_and_no_job(redis, fake, caplog):
    settings = slack_settings()
    async with adapter(fake, redis, settings):
        answers = [
            await fake.post(json.dumps(event_callback(dm("hi"))), headers={"X-Slack-Request-Timestamp": "soon"}),
            await fake.post('{"type": "event_callback", "event": '),  # signed, but not JSON
            await fake.post(json.dumps([event_callback(dm("hi"))])),  # signed JSON array
        ]
        async with aiohttp.ClientSession() as session:
            binary = bytes(range(256)) * 4
            async with session.post(fake.request_url, data=binary, headers={"Content-Type": "application/octet-stream"}) as response:
                answers.append(Answer(response.status, await response.text(), 0))
        health = await adapter_health(settings)
    assert [answer.status for answer in answers] == [400, 400, 400, 401]
    assert await job_keys(redis) == []
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]
    assert health == 200  # and the adapter is still up


async def test_past_a_persons_limit_the_message_gets_one_sentence_and_nothing_is_queued(redis, fake):
    settings = slack_settings().model_copy(update={"limits": LimitSettings(max_queued_per_author=2)})
    async with adapter(fake, redis, settings):  # no worker: the messages wait
        for text in ("one", "two", "three"):
            await send_event(fake, dm(text))
        await fake.wait_for(lambda: fake.calls_to("chat.postMessage"))
    [told] = fake.calls_to("chat.postMessage")
    assert told.body["markdown_text"] == "You already have 2 messages waiting for an answer: please wait for them before sending more."
    assert len(await job_keys(redis)) == 2


@contextlib.asynccontextmanager
async def redis_refusing_writes(redis):
    """Redis full: past maxmemory, with nothing to evict, it refuses every write (OOM) until the block ends."""
    saved = await redis.config_get("maxmemory*")
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", 1)
    try:
        yield
    finally:
        await redis.config_set("maxmemory", saved["maxmemory"])
        await redis.config_set("maxmemory-policy", saved["maxmemory-policy"])


async def test_with_redis_full_a_message_gets_one_apology_and_is_acknowledged(redis, fake):
    settings = slack_settings()
    event = dm("Hello while Redis is full")
    # Listeners only: a full Redis also stops reply delivery (contract/reply_shards.py), a defect of its own.
    async with adapter(fake, redis, settings, delivering=False):
        async with redis_refusing_writes(redis):
            answers = await fake.deliver(event_callback(event))
            await fake.wait_for(lambda: fake.messages_in(DM))
    assert [answer.status for answer in answers] == [200]  # acknowledged: Slack does not send it again
    assert [(m.text, m.thread_ts) for m in fake.messages_in(DM)] == [(UNAVAILABLE, event["ts"])]
    assert await job_keys(redis) == []


async def test_with_redis_down_a_message_gets_one_apology_and_is_acknowledged(fake):
    settings = slack_settings(mode="socket")
    down = connect(f"redis://127.0.0.1:{free_port()}")  # nothing listens there
    event = dm("Hello while Redis is down")
    try:
        async with adapter(fake, down, settings, redis_down=True):
            envelope = await fake.send_envelope("events_api", event_callback(event))
            await fake.wait_for(lambda: fake.ack_of(envelope), timeout=fake.ack_timeout_s)  # before Slack sends it again
            await fake.wait_for(lambda: fake.messages_in(DM))
    finally:
        await down.aclose()
    assert len(fake.envelopes) == 1
    assert [(m.text, m.thread_ts) for m in fake.messages_in(DM)] == [(UNAVAILABLE, event["ts"])]


async def test_retried_delivery_gets_no_second_job_or_reply(redis, fake, tiny_engine):
    settings = slack_settings()
    event = dm("Tell me about strawberries.")
    payload = event_callback(event)
    body = json.dumps(payload)
    job_id = f"slack:{DM}-{event['ts']}"
    retry = {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
    async with adapter(fake, redis, settings):
        [first] = await fake.deliver(payload)
        assert first.status == 200
        # Slack sends it again when the acknowledgement is lost on the way.
        assert (await fake.post(body, headers=retry)).status == 200
        assert await job_keys(redis) == [f"chatbot:job:{job_id}"]
        assert await redis.llen(keys.conv_jobs(f"slack:{DM}:{event['ts']}")) == 1
        async with running_worker(redis, tiny_engine, settings):
            await answer_shown(fake, redis, job_id, before=0)
            # A retry after the answer is a no-op too: the job id is remembered as done.
            retry["X-Slack-Retry-Num"] = "2"
            assert (await fake.post(body, headers=retry)).status == 200
            assert await job_keys(redis) == []
    assert [e.kind for e in await reply_events(redis, "slack", job_id) if e.kind != "partial"] == ["final"]
    assert len(fake.messages_in(DM)) == 1 and len(fake.calls_to("assistant.threads.setStatus")) == 1


async def test_bot_edited_deleted_and_channel_messages_are_ignored(redis, fake):
    settings = slack_settings()  # mentions off
    ts = new_ts()
    ignored = [
        dm("I am a bot", subtype="bot_message", bot_id="B9OTHER", user=None),
        dm("I am an app without subtype", bot_id="B9OTHER", user="U9APP"),
        dm("my own reply", bot_id=BOT_ID, user=BOT_USER_ID),
        dm("", subtype="message_changed", user=None, message={"type": "message", "user": ALICE, "text": "edited", "ts": ts}),
        dm("", subtype="message_deleted", user=None, deleted_ts=ts),
        dm("joined", subtype="channel_join"),
        {**dm("a channel message"), "channel": CHANNEL, "channel_type": "channel"},
        {"type": "app_mention", "channel": CHANNEL, "user": ALICE, "text": f"<@{BOT_USER_ID}> hi", "ts": ts, "event_ts": ts},
    ]
    async with adapter(fake, redis, settings):
        for event in ignored:
            await send_event(fake, event)
    assert await job_keys(redis) == []
    assert fake.calls_to("chat.postMessage") == []


async def queued_text(redis, job_id: str) -> str:
    return Job.model_validate_json(await redis.hget(keys.job(job_id), "data")).text


async def test_a_dm_with_files_reads_text_files_names_the_others_and_keeps_under_the_limit(redis, fake):
    settings = slack_settings().model_copy(update={"limits": LimitSettings(max_message_chars=2_000)})
    script = "\n".join(f"print({n})" for n in range(500))  # 5,389 characters: it is cut to fit
    files = [
        fake.share_file("notes", b"Remember the milk.", "text/plain"),
        fake.share_file("photo.png", b"\x89PNG\r\n\x1a\n", "image/png"),
        fake.share_file("huge.log", b"x" * 100_001, "text/plain"),
        fake.share_file("script.py", script.encode(), "text/x-python"),
    ]
    async with adapter(fake, redis, settings):  # no worker: the job waits
        sent = await send_dm(fake, "What does this do?", subtype="file_share", files=files, upload=True)
        text = await queued_text(redis, sent.job_id)
        await fake.wait_for(lambda: fake.messages_in(DM))
    [told] = fake.messages_in(DM)  # the person learns that the file was cut
    assert (told.text, told.thread_ts) == (CUT_NOTICE.format(files="script.py", limit=2_000), sent.ts)
    assert text.startswith(
        "What does this do?\n\n--- notes ---\nRemember the milk.\n\n(attached, not read: photo.png, not a text file)\n\n"
        "(attached, not read: huge.log, too large)\n\n--- script.py (cut: first "
    )
    assert "print(0)\nprint(1)\n" in text and len(text) <= 2_000
    assert [(call.body["path"].rsplit("/", 1)[-1], call.token) for call in fake.downloads] == [
        ("notes", "xoxb-test-token"), ("script.py", "xoxb-test-token")
    ]
    assert fake.titles == {(DM, sent.ts): "What does this do?"}


async def test_files_none_readable_get_one_sentence_and_a_broadcast_thread_reply_is_answered(redis, fake):
    settings = slack_settings()
    async with adapter(fake, redis, settings):
        image = await send_dm(fake, "", subtype="file_share", files=[fake.share_file("photo.png", b"\x89PNG", "image/png")])
        await fake.wait_for(lambda: fake.messages_in(DM))
        broadcast = await send_dm(fake, "Also in the chat, please", subtype="thread_broadcast", thread_ts=image.ts)
    assert [(m.text, m.thread_ts) for m in fake.messages_in(DM)] == [(NOT_READABLE, image.ts)]
    assert await job_keys(redis) == [f"chatbot:job:{broadcast.job_id}"]


async def test_empty_message_is_answered_with_one_sentence_where_it_was_asked(redis, fake):
    settings = slack_settings()
    thread = new_ts()
    async with adapter(fake, redis, settings):
        await send_dm(fake, "   ", thread_ts=thread)
        await fake.wait_for(lambda: fake.messages_in(DM))
    assert [(m.text, m.thread_ts) for m in fake.messages_in(DM)] == [(EMPTY_MESSAGE, thread)]
    assert await job_keys(redis) == []


async def test_two_threads_in_one_dm_are_two_conversations_and_reset_forgets_both(redis, fake, tiny_engine):
    settings = slack_settings()
    async with adapter(fake, redis, settings), running_worker(redis, tiny_engine, settings) as worker:
        first = await send_dm(fake, COLOUR_CONVERSATION[0])
        await answer_shown(fake, redis, first.job_id, before=0)
        second = await send_dm(fake, "Tell me about strawberries.")  # a new top-level message: a new thread
        await answer_shown(fake, redis, second.job_id, before=1)
        assert [m.thread_ts for m in fake.messages_in(DM)] == [first.ts, second.ts]
        assert [e.user.text for e in await history.load_exchanges(redis, first.conversation)] == [COLOUR_CONVERSATION[0]]
        assert [e.user.text for e in await history.load_exchanges(redis, second.conversation)] == ["Tell me about strawberries."]

        reset = await fake.post(slash_command(), "application/x-www-form-urlencoded")
        assert reset.status == 200 and reset.seconds < 3
        assert json.loads(reset.body) == {"response_type": "ephemeral", "text": RESET_DONE}
        assert await history.load_exchanges(redis, first.conversation) == []
        assert await history.load_exchanges(redis, second.conversation) == []

        question = "What is my favorite color?"
        prompt = worker.builder.build(await history.load_exchanges(redis, first.conversation), question)
        assert prompt.kept_exchanges == 0 and "strawberry" not in prompt.text
        later = await send_dm(fake, question, thread_ts=first.ts)  # the old thread, after the reset
        await answer_shown(fake, redis, later.job_id, before=2)
        assert [e.user.text for e in await history.load_exchanges(redis, first.conversation)] == [question]

        in_channel = await fake.post(slash_command(CHANNEL, "general"), "application/x-www-form-urlencoded")
        assert json.loads(in_channel.body) == {"response_type": "ephemeral", "text": RESET_IN_CHANNEL}
    assert fake.calls_to("chat.postEphemeral") == []  # the answer rode on the acknowledgement


async def test_colour_conversation_keeps_its_history_in_its_thread(redis, fake, tiny_engine):
    settings = slack_settings()
    async with adapter(fake, redis, settings), running_worker(redis, tiny_engine, settings) as worker:
        first = await send_dm(fake, COLOUR_CONVERSATION[0])
        await answer_shown(fake, redis, first.job_id, before=0)
        second = await send_dm(fake, COLOUR_CONVERSATION[1], thread_ts=first.ts)
        await answer_shown(fake, redis, second.job_id, before=1)
        exchanges = await history.load_exchanges(redis, first.conversation)
        assert [e.user.text for e in exchanges] == COLOUR_CONVERSATION[:2]
        third = worker.builder.build(exchanges, COLOUR_CONVERSATION[2])
        assert third.kept_exchanges == 2 and third.dropped_exchanges == 0
        for exchange in exchanges:
            assert exchange.user.text in third.text and exchange.assistant.text in third.text
        await answer_shown(fake, redis, (await send_dm(fake, COLOUR_CONVERSATION[2], thread_ts=first.ts)).job_id, before=2)
    assert len(await history.load_exchanges(redis, first.conversation)) == 3
    assert {m.thread_ts for m in fake.messages_in(DM)} == {first.ts}
    assert list(fake.titles) == [(DM, first.ts)]  # titled once, when the thread started


async def test_mentions_are_answered_in_their_thread_with_the_author_named(redis, fake, tiny_engine):
    settings = slack_settings(answer_mentions=True)
    first = new_ts()
    mentions = [
        {"type": "app_mention", "channel": CHANNEL, "user": ALICE, "text": f"<@{BOT_USER_ID}> My favorite color is blue.", "ts": first},
        {"type": "app_mention", "channel": CHANNEL, "user": ALICE, "text": f"<@{BOT_USER_ID}> And my fruit?", "ts": new_ts(), "thread_ts": first},
    ]
    async with adapter(fake, redis, settings), running_worker(redis, tiny_engine, settings):
        for index, event in enumerate(mentions):
            await send_event(fake, event)
            await answer_shown(fake, redis, f"slack:{CHANNEL}-{event['ts']}", before=index, channel=CHANNEL)
    assert {m.thread_ts for m in fake.messages_in(CHANNEL)} == {first}
    exchanges = await history.load_exchanges(redis, f"slack:{CHANNEL}:{first}")
    assert [(e.user.name, e.user.text) for e in exchanges] == [
        ("Alice", "Alice: My favorite color is blue."), ("Alice", "Alice: And my fruit?")
    ]
    assert len(fake.calls_to("users.info")) == 1  # names are looked up once


async def test_long_reply_is_split_under_the_limit(redis, fake):
    settings = slack_settings()
    words = [f"word{i}" for i in range(1800)]  # about 15,000 characters
    text = " ".join(words)
    async with adapter(fake, redis, settings):
        await publish(redis, ReplyEvent(job_id="slack:long", conversation=DM_CONVERSATION, kind="final", text=text, reply_to={"channel": DM}))
        await fake.wait_for(lambda: " ".join(m.text for m in fake.messages_in(DM)).split() == words)
    texts = [m.text for m in fake.messages_in(DM)]
    assert len(texts) == 4 and all(len(t) <= LIMIT for t in texts)


async def test_streamed_edits_are_rate_limited(redis, fake):
    settings = slack_settings(edit_interval_s=0.5)
    reply_to = {"channel": DM}
    async with adapter(fake, redis, settings):
        text = ""
        for index in range(50):  # a partial every 40 ms for 2 s
            text += f" w{index}"
            await publish(redis, ReplyEvent(job_id="slack:stream", conversation=DM_CONVERSATION, kind="partial", text=text.strip(), reply_to=reply_to))
            await asyncio.sleep(0.04)
        text += " end."
        await publish(redis, ReplyEvent(job_id="slack:stream", conversation=DM_CONVERSATION, kind="final", text=text.strip(), reply_to=reply_to))
        await fake.wait_for(lambda: [m.text for m in fake.messages_in(DM)] == [text.strip()])
    [message] = fake.messages_in(DM)
    gaps = [later - earlier for earlier, later in itertools.pairwise(message.writes)]
    assert 3 <= len(message.writes) <= 2.0 / 0.5 + 2
    assert all(gap >= 0.5 - 0.02 for gap in gaps)  # the final text too waits for its turn


async def test_rate_limited_edit_waits_and_lands(redis, fake):
    settings = slack_settings()
    reply_to = {"channel": DM}
    async with adapter(fake, redis, settings):
        await publish(redis, ReplyEvent(job_id="slack:slow", conversation=DM_CONVERSATION, kind="partial", text="Once", reply_to=reply_to))
        await fake.wait_for(lambda: fake.messages_in(DM))
        fake.rate_limit_next("chat.update", retry_after_s=1)
        await publish(redis, ReplyEvent(job_id="slack:slow", conversation=DM_CONVERSATION, kind="final", text="Once upon a time.", reply_to=reply_to))
        await fake.wait_for(lambda: [m.text for m in fake.messages_in(DM)] == ["Once upon a time."])
    first, second = fake.calls_to("chat.update")
    assert second.at - first.at >= 1.0


@pytest.mark.parametrize("failure", ["internal_error", "http_503", "reset"])
async def test_a_final_that_slack_fails_once_is_shown_all_the_same(redis, fake, failure):
    """Before: the final was acknowledged and never shown; the message kept its partial text."""
    settings = slack_settings(streaming=False)
    reply_to = {"channel": DM}
    async with adapter(fake, redis, settings):
        await publish(redis, ReplyEvent(job_id="slack:f", conversation=DM_CONVERSATION, kind="partial", text="Once", reply_to=reply_to))
        await fake.wait_for(lambda: [m.text for m in fake.messages_in(DM)] == ["Once"])
        fake.fail_next("chat.update", failure)
        await publish(redis, ReplyEvent(job_id="slack:f", conversation=DM_CONVERSATION, kind="final", text="Once upon a time.", reply_to=reply_to))
        await fake.wait_for(lambda: [m.text for m in fake.messages_in(DM)] == ["Once upon a time."])
    assert len(fake.calls_to("chat.update")) == 2


async def test_model_text_never_pings_and_errors_read_as_a_sentence(redis, fake):
    settings = slack_settings()
    reply_to = {"channel": DM}
    risky = "Hi <!channel> & <@U2BOB>, see <https://x.test|this>"
    async with adapter(fake, redis, settings):
        await publish(redis, ReplyEvent(job_id="slack:risky", conversation=DM_CONVERSATION, kind="final", text=risky, reply_to=reply_to))
        await publish(redis, ReplyEvent(job_id="slack:error", conversation=DM_CONVERSATION, kind="error", text="Sorry, it failed.", reply_to=reply_to))
        await fake.wait_for(lambda: len(fake.messages_in(DM)) == 2)
    risky_message, error_message = fake.messages_in(DM)
    # Slack's markdown would read <!channel> and <@U2BOB> as pings: a zero-width space keeps them text.
    assert risky_message.text == "Hi <\u200b!channel> & <\u200b@U2BOB>, see <https://x.test|this>"
    assert error_message.text == "Sorry, it failed." and not error_message.feedback_buttons


async def test_socket_mode_receives_events_and_commands(redis, fake, tiny_engine):
    settings = slack_settings(mode="socket")
    event = dm("Hello over the socket")
    async with adapter(fake, redis, settings), running_worker(redis, tiny_engine, settings):
        envelope = await fake.send_envelope("events_api", event_callback(event))
        await fake.wait_for(lambda: fake.ack_of(envelope))
        await answer_shown(fake, redis, f"slack:{DM}-{event['ts']}", before=0)
        assert await history.load_exchanges(redis, f"slack:{DM}:{event['ts']}")
        command = await fake.send_envelope("slash_commands", dict(parse_qsl(slash_command())))
        ack = await fake.wait_for(lambda: fake.ack_of(command))
    assert ack["payload"] == {"response_type": "ephemeral", "text": RESET_DONE}
    assert await history.load_exchanges(redis, f"slack:{DM}:{event['ts']}") == []
    [connect] = fake.calls_to("apps.connections.open")
    assert connect.token == "xapp-test-token"


async def test_reply_published_while_down_is_delivered_once_after_restart(redis, fake):
    settings = slack_settings()
    reply_to = {"channel": DM}

    def event(job: str, kind: str, text: str) -> ReplyEvent:
        return ReplyEvent(job_id=f"slack:{job}", conversation=DM_CONVERSATION, kind=kind, text=text, reply_to=reply_to)

    async with adapter(fake, redis, settings):
        await publish(redis, event("b", "partial", "Half an"))
        await fake.wait_for(lambda: [m.text for m in fake.messages_in(DM)] == ["Half an"])
    await publish(redis, event("a", "final", "Sent while the adapter was down."))
    await publish(redis, event("b", "final", "Half an answer, finished while the adapter was down."))
    for start in range(2):  # the second start must find nothing left to deliver
        async with adapter(fake, redis, settings):
            # Delivery keeps stream order, so once a reply published now is shown, whatever this
            # start would deliver again has been shown too: no timed wait guards the negative.
            marker = f"Marker {start}."
            await publish(redis, event(f"marker{start}", "final", marker))
            await fake.wait_for(lambda marker=marker: marker in [m.text for m in fake.messages_in(DM)])
    assert [m.text for m in fake.messages_in(DM)] == [
        "Half an answer, finished while the adapter was down.", "Sent while the adapter was down.", "Marker 0.", "Marker 1."
    ]
    assert len(fake.calls_to("chat.update")) == 1


def test_manifest_matches_the_adapter():
    manifest = yaml.safe_load((ROOT / "slack_manifest.yaml").read_text())
    features = manifest["features"]
    assert [c["command"] for c in features["slash_commands"]] == [SlackSettings().reset_command, SlackSettings().persona_command]
    assert all(c["description"] and c["should_escape"] is False for c in features["slash_commands"])
    # The agent surface's events; assistant_thread_started belongs to the legacy assistant_view.
    assert set(manifest["settings"]["event_subscriptions"]["bot_events"]) == {
        "message.im", "app_mention", "app_home_opened", "agent_session_stopped"  # the last: the session's native Stop
    }
    scopes = {"assistant:write", "chat:write", "im:history", "commands", "users:read", "files:read"}
    assert scopes <= set(manifest["oauth_config"]["scopes"]["bot"])
    assert manifest["settings"]["socket_mode_enabled"] and SlackSettings().mode == "socket"
    assert manifest["settings"]["interactivity"]["is_enabled"]  # the feedback buttons
    assert features["app_home"]["messages_tab_enabled"]
    # The current agent surface, not the legacy assistant_view; its prompts are the configured ones.
    assert "assistant_view" not in features and features["agent_view"]["agent_description"]
    configured = yaml.safe_load((ROOT / "config.yaml").read_text())["slack"]["suggested_prompts"]
    defaults = [prompt.model_dump() for prompt in SlackSettings().suggested_prompts]
    assert features["agent_view"]["suggested_prompts"] == configured == defaults


async def test_missing_tokens_fail_at_start_by_name(redis):
    socket_settings = tiny_settings(slack={"mode": "socket"})
    with pytest.raises(ConfigError, match="SLACK_APP_TOKEN"):
        await run_slack(socket_settings, Secrets(values={"SLACK_BOT_TOKEN": "xoxb-x"}), redis)
    with pytest.raises(ConfigError, match="SLACK_SIGNING_SECRET"):
        await run_slack(slack_settings(), Secrets(values={"SLACK_BOT_TOKEN": "xoxb-x"}), redis)
    with pytest.raises(ConfigError, match="SLACK_BOT_TOKEN"):
        await run_slack(socket_settings, Secrets(values={"SLACK_APP_TOKEN": "xapp-x"}), redis)


def test_slack_markup_reads_as_plain_text():
    assert from_slack(f"<@{BOT_USER_ID}>  what is   <https://a.test/x|this> &amp; &lt;b&gt;?", drop_user=BOT_USER_ID) == "what is this (https://a.test/x) & <b>?"
    assert from_slack("ask <@U2BOB> in <#C1|general>, <!here> <https://a.test>") == "ask @U2BOB in #general, @here https://a.test"


# --- the fake is as strict as Slack where the adapter could get it wrong ----------------------


async def test_fake_slack_retries_an_event_the_app_fails_or_answers_late(fake):
    answers = iter([web.Response(status=500), None, web.Response(status=200)])  # None: too late
    received: list[dict[str, str]] = []

    async def app(request: web.Request) -> web.Response:
        assert SignatureVerifier(SIGNING_SECRET).is_valid_request(await request.read(), dict(request.headers))
        received.append(dict(request.headers))
        answer = next(answers)
        if answer is None:
            await asyncio.sleep(fake.ack_timeout_s * 2)
            return web.Response(status=200)
        return answer

    server = web.Application()
    server.router.add_post("/slack/events", app)
    runner, port = await serve_locally(server)
    fake.ack_timeout_s, fake.retry_delays_s = 0.3, (0.0, 0.1, 0.1)
    fake.request_url = f"http://127.0.0.1:{port}/slack/events"
    try:
        answers_seen = await fake.deliver(event_callback(dm("Hello")))
    finally:
        await shut_down(runner, set())
    assert [answer.status for answer in answers_seen] == [500, None, 200]
    assert [(h.get("X-Slack-Retry-Num"), h.get("X-Slack-Retry-Reason")) for h in received] == [
        (None, None), ("1", "http_error"), ("2", "http_timeout")
    ]


async def test_fake_slack_sends_an_unacknowledged_envelope_again(fake):
    fake.ack_timeout_s, fake.retry_delays_s = 0.3, (0.0, 0.1, 0.1)
    async with aiohttp.ClientSession() as session, session.ws_connect(f"ws://127.0.0.1:{fake.port}{SOCKET_PATH}") as socket:
        assert (await socket.receive_json(timeout=5))["type"] == "hello"
        sent = await fake.send_envelope("events_api", event_callback(dm("Hello")))
        first = await socket.receive_json(timeout=5)
        again = await socket.receive_json(timeout=5)  # not acknowledged: Slack sends it again
        await socket.send_json({"envelope_id": again["envelope_id"]})
        await fake.wait_for(lambda: fake.ack_of(again["envelope_id"]))
    assert first["envelope_id"] == sent and (first["retry_attempt"], again["retry_attempt"]) == (0, 1)
    assert again["retry_reason"] == "timeout" and again["payload"] == first["payload"]
    assert len(fake.envelopes) == 2  # acknowledged: no third


async def test_fake_slack_refuses_a_status_on_an_unknown_thread_and_blocks_it_does_not_know(fake):
    client = web_client(SECRETS.get("SLACK_BOT_TOKEN"), base_url=fake.api_url)
    with pytest.raises(SlackApiError, match="invalid_thread_ts"):
        await client.assistant_threads_setStatus(channel_id=DM, thread_ts=new_ts(), status="is thinking…")
    for blocks in (
        [{"type": "carousel", "text": "x"}],  # not a block type
        [{"type": "markdown"}],  # without its text
        [{"type": "context_actions", "elements": [{"type": "feedback_buttons", "positive_button": {"value": "good 1"}}]}],
        [{"type": "section", "text": {"type": "html", "text": "x"}}],  # not a text object
    ):
        with pytest.raises(SlackApiError, match="invalid_blocks"):
            await client.chat_postMessage(channel=DM, text="x", blocks=blocks)
    posted = await client.chat_postMessage(channel=DM, text="x", blocks=[
        {"type": "section", "text": {"type": "mrkdwn", "text": "*x*"}}, {"type": "markdown", "text": "**x**"},
    ])
    await client.assistant_threads_setStatus(channel_id=DM, thread_ts=posted["ts"], status="is thinking…")
    assert fake.status_now[(DM, posted["ts"])] == "is thinking…"
