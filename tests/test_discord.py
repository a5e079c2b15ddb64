"""The Discord adapter through discord.py's own REST and gateway code, against a local fake Discord."""

from __future__ import annotations

import asyncio
import contextlib
import time

import discord
import pytest
import yarl

from bot.attachments_text import CUT_NOTICE
from bot.discord.app import run_discord
from bot.discord.attachments import NOT_READABLE
from bot.discord.client import QUEUE_NOTICE
from bot.discord.commands import (
    NOW,
    PERSONA_CLEARED,
    PERSONA_FAILED,
    PERSONA_NONE_SET,
    PERSONA_NOT_HERE,
    PERSONA_REFUSED,
    PERSONA_SET,
    RESET_DONE,
    RESET_REFUSED,
    SOURCES,
)
from bot.discord.outbox import LIMIT
from bot.discord.routing import reply_route
from contract import history, keys
from contract.history import Turn
from contract.jobs import EMPTY_MESSAGE, Job, ReplyEvent, Scope
from contract.personas import MAX_PERSONA_CHARS, Personas, SystemPrompt
from contract.replies import CONSUMER, GROUP, reply_stream
from service.config import ConfigError, Secrets
from service.tasks import cancel_until_done
from tests.conftest import reply_events, running_worker, shards_held, tiny_settings
from tests.fakes.discord_server import (
    ADMIN,
    ADMIN_ROLE,
    ALICE,
    APPLICATION_ID,
    BOB,
    BOT,
    CAROL,
    CLOSED,
    DM_CHANNEL,
    GENERAL,
    GUILD_ID,
    MANAGE_CHANNELS,
    MEMBER_ROLE,
    OTHER_BOT,
    QUIET,
    THREAD,
    FakeDiscord,
    subcommand,
)
from tests.test_personas import recording_engine

TOKEN = "fake-discord-token-0123456789"
COLOUR_CONVERSATION = [
    "My favorite color is blue. My favorite fruit is strawberry.",
    "Name a fruit that is on my favorite colour.",
    "What is the colour of my favorite fruit ?",
]


def discord_settings(limits: dict | None = None, **discord_overrides):
    wanted = {"guilds": [GUILD_ID], "channels": [GENERAL, QUIET], "mention_only_channels": [QUIET], **discord_overrides}
    return tiny_settings(discord=wanted, limits=limits or {})


@pytest.fixture
async def fake(monkeypatch):
    server = await FakeDiscord(TOKEN).start()
    monkeypatch.setattr(discord.http.Route, "BASE", server.rest_base)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(server.gateway_url))
    yield server
    await server.stop()


@contextlib.asynccontextmanager
async def adapter(redis, fake: FakeDiscord, settings):
    """run_discord as `chatbot discord` runs it, until the block ends; yields once the gateway is up."""
    sessions = fake.identified
    task = asyncio.create_task(run_discord(settings, Secrets(values={"DISCORD_TOKEN": TOKEN}), redis))
    try:
        await fake.wait_for(lambda: fake.identified > sessions or task.done())
        if task.done():
            task.result()
        await shards_held(redis, "discord")
        yield task
    finally:
        await cancel_until_done([task])


async def say(fake: FakeDiscord, content: str, author=ALICE, channel_id=GENERAL, **kwargs) -> int:
    data = fake.message(content, author, channel_id, **kwargs)
    await fake.dispatch("MESSAGE_CREATE", data)
    return int(data["id"])


async def events_of(redis, job_id: str) -> list[ReplyEvent]:
    return await reply_events(redis, "discord", job_id)


async def final_event(redis, message_id: int, timeout: float = 60.0) -> ReplyEvent:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [e for e in await events_of(redis, f"discord:{message_id}") if e.kind != "partial"]
        if done:
            return done[-1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no final reply event for message {message_id}")


async def shown_answer(fake: FakeDiscord, message_id: int, text: str) -> list:
    """Wait until the bot's messages answering `message_id` show `text`; returns them."""
    def shown():
        messages = fake.replies_to(message_id)
        return messages if " ".join(m.text for m in messages).split() == text.split() else None

    return await fake.wait_for(shown)


async def ask(fake: FakeDiscord, redis, content: str, **kwargs) -> tuple[int, ReplyEvent]:
    message_id = await say(fake, content, **kwargs)
    event = await final_event(redis, message_id)
    await shown_answer(fake, message_id, event.text)
    return message_id, event


async def queued_jobs(redis) -> dict[str, Job]:
    jobs = {}
    for key in await redis.keys(keys.job("*")):
        job = Job.model_validate_json(await redis.hget(key, "data"))
        jobs[job.id] = job
    return jobs


async def jobs_for(redis, *message_ids: int) -> dict[str, Job]:
    """All queued jobs, once those of `message_ids` are there."""
    wanted = {f"discord:{message_id}" for message_id in message_ids}
    deadline = time.monotonic() + 10
    while not wanted <= (jobs := await queued_jobs(redis)).keys():
        assert time.monotonic() < deadline, f"not queued: {wanted - jobs.keys()}"
        await asyncio.sleep(0.02)
    return jobs


async def settle(fake: FakeDiscord, redis, sentinel: dict) -> dict[str, Job]:
    """Send a message that is answered and wait for its job. discord.py handles gateway events
    in order and an ignored message is dropped before its handler first waits, so every
    message ignored before the sentinel has been dealt with by then."""
    await fake.dispatch("MESSAGE_CREATE", sentinel)
    return await jobs_for(redis, int(sentinel["id"]))


# --- the whole path ---------------------------------------------------------------------


async def test_message_is_answered_through_the_worker(redis, fake, tiny_engine):
    settings = discord_settings()
    async with adapter(redis, fake, settings), running_worker(redis, tiny_engine, settings):
        message_id, final = await ask(fake, redis, "Hello there, who are you?")

    assert final.kind == "final" and final.text
    [answer] = fake.replies_to(message_id)
    assert answer.channel_id == GENERAL and answer.text == final.text
    # Streamed: posted with the first words, then edited into the whole answer.
    assert len(answer.contents) >= 2 and final.text.startswith(answer.contents[0]) and answer.contents[0] != final.text
    [post] = fake.requests("POST", f"/channels/{GENERAL}/messages")
    assert int(post.body["message_reference"]["message_id"]) == message_id
    # The reply pings its author and nobody else, whatever the model writes.
    assert post.body["allowed_mentions"] == {"parse": [], "replied_user": True}
    typing = fake.requests("POST", f"/channels/{GENERAL}/typing")
    assert typing and typing[0].at < post.at
    [exchange] = await history.load_exchanges(redis, f"discord:{GENERAL}")
    assert exchange.user.name == "Alice" and exchange.user.text == "Alice: Hello there, who are you?"
    assert exchange.assistant.text == final.text


async def test_the_colour_conversation_keeps_its_history(redis, fake, tiny_engine):
    settings = discord_settings()
    async with adapter(redis, fake, settings), running_worker(redis, tiny_engine, settings) as worker:
        for text in COLOUR_CONVERSATION[:2]:
            await ask(fake, redis, text)
        exchanges = await history.load_exchanges(redis, f"discord:{GENERAL}")
        third = worker.builder.build(exchanges, COLOUR_CONVERSATION[2], "Alice")
        assert third.kept_exchanges == 2
        for text in COLOUR_CONVERSATION[:2]:
            assert f"Alice: {text}" in third.text
        for exchange in exchanges:
            assert exchange.assistant.text in third.text
        await ask(fake, redis, COLOUR_CONVERSATION[2])
    exchanges = await history.load_exchanges(redis, f"discord:{GENERAL}")
    assert [e.user.text for e in exchanges] == [f"Alice: {text}" for text in COLOUR_CONVERSATION]


# --- what is not answered ---------------------------------------------------------------


async def test_bots_system_messages_edits_and_closed_channels_are_ignored(redis, fake):
    async with adapter(redis, fake, discord_settings()):
        earlier = fake.message("an edited message", ALICE, GENERAL)
        await say(fake, "in a closed channel", channel_id=CLOSED)
        await say(fake, "from another bot", author=OTHER_BOT)
        await say(fake, "from the bot itself", author=BOT)
        await say(fake, "", type=7)  # a member joined
        await say(fake, "pinned a message", type=6)
        await fake.dispatch("MESSAGE_UPDATE", {**earlier, "content": "edited", "edited_timestamp": "2024-01-01T00:01:00+00:00"})
        await say(fake, "not mentioned", channel_id=QUIET)
        jobs = await settle(fake, redis, fake.message("the sentinel"))

    assert [job.text for job in jobs.values()] == ["the sentinel"]
    assert fake.requests("POST", f"/channels/{CLOSED}") == []
    assert not fake.bot_messages


@pytest.mark.parametrize(
    ("overrides", "ignored", "sentinel"),
    [
        ({"roles": [MEMBER_ROLE]}, dict(author=BOB), dict(author=ALICE)),
        ({"allow_dms": False}, dict(channel_id=DM_CHANNEL), dict()),
        ({"guilds": [GUILD_ID + 1]}, dict(), dict(channel_id=DM_CHANNEL)),
        ({"mention_only": True}, dict(), dict()),
    ],
    ids=["role", "dm", "guild", "mention-only"],
)
async def test_allow_lists(redis, fake, overrides, ignored, sentinel):
    async with adapter(redis, fake, discord_settings(**overrides)):
        await say(fake, "not for me", **ignored)
        jobs = await settle(fake, redis, fake.message(f"<@{BOT.id}> the sentinel", mentions=(BOT,), **sentinel))
    assert [job.text for job in jobs.values()] == ["the sentinel"]


async def test_dms_threads_and_mentions_make_the_right_jobs(redis, fake):
    async with adapter(redis, fake, discord_settings()):
        dm = await say(fake, "a direct message", author=BOB, channel_id=DM_CHANNEL)
        thread = await say(fake, "in a thread", channel_id=THREAD)
        quiet = await say(fake, f"<@{BOT.id}>   what do you think of <@{BOB.id}>?", channel_id=QUIET, mentions=(BOT, BOB))
        jobs = await jobs_for(redis, dm, thread, quiet)

    assert jobs[f"discord:{dm}"].conversation == f"discord:{DM_CHANNEL}"
    assert jobs[f"discord:{dm}"].author is None  # one person per DM: no names in the prompt
    assert jobs[f"discord:{thread}"].conversation == f"discord:{THREAD}"
    assert jobs[f"discord:{thread}"].author == "Alice"
    assert jobs[f"discord:{quiet}"].text == "what do you think of @Bob?"
    assert jobs[f"discord:{quiet}"].reply_to == reply_route(QUIET, quiet)


async def test_an_empty_mention_is_answered_with_a_sentence(redis, fake):
    async with adapter(redis, fake, discord_settings()):
        message_id = await say(fake, f"<@{BOT.id}>", channel_id=QUIET, mentions=(BOT,))
        [answer] = await fake.wait_for(lambda: fake.replies_to(message_id))
    assert answer.text == EMPTY_MESSAGE
    assert await queued_jobs(redis) == {}


async def test_a_redelivered_gateway_event_is_queued_once(redis, fake):
    async with adapter(redis, fake, discord_settings(queue_notice_threshold=1)):
        data = fake.message("hello")
        await fake.dispatch("MESSAGE_CREATE", data)
        await fake.dispatch("MESSAGE_CREATE", data)
        await jobs_for(redis, int(data["id"]))
        later = await say(fake, "a later message", channel_id=THREAD)
        jobs = await jobs_for(redis, later)
        [notice] = await fake.wait_for(lambda: fake.replies_to(later))
    assert sorted(jobs) == sorted([f"discord:{data['id']}", f"discord:{later}"])
    # The later message waits behind one job only: the duplicate added none, and got no notice.
    assert notice.text == QUEUE_NOTICE.format(position=2)
    assert len(fake.bot_messages) == 1


async def test_one_typing_indicator_per_channel_however_many_messages_wait(redis, fake, tiny_engine):
    settings = discord_settings(queue_notice_threshold=10)
    async with adapter(redis, fake, settings):
        message_ids = [await say(fake, f"question {n}", author=ALICE if n % 2 else BOB) for n in range(5)]
        await jobs_for(redis, *message_ids)  # all five wait: no worker yet
        async with running_worker(redis, tiny_engine, settings):
            # Read what was shown, not the reply stream: delivered events are trimmed from it.
            await fake.wait_for(lambda: all(fake.replies_to(message_id) for message_id in message_ids))
            # A reply shows from its first partial on; its exchange is stored with its final.
            deadline = time.monotonic() + 30
            while len(await history.load_exchanges(redis, f"discord:{GENERAL}")) < 5:
                assert time.monotonic() < deadline, "the five exchanges not stored within 30 s"
                await asyncio.sleep(0.05)
    assert len(fake.requests("POST", f"/channels/{GENERAL}/typing")) == 1


async def test_text_attachments_are_read_with_the_message_and_others_named(redis, fake):
    async with adapter(redis, fake, discord_settings(attachment_max_bytes=1000)):
        data = fake.message(
            "What does this do?",
            files=(("hello.py", "text/x-python", b"print('hello')\n"), ("notes.md", "", b"# Notes\nbuy milk"),
                   ("big.txt", "text/plain", b"x" * 1001), ("cat.png", "image/png", b"\x89PNG")),
        )
        await fake.dispatch("MESSAGE_CREATE", data)
        jobs = await jobs_for(redis, int(data["id"]))
    assert jobs[f"discord:{data['id']}"].text == (
        "What does this do?\n\n--- hello.py ---\nprint('hello')\n\n--- notes.md ---\n# Notes\nbuy milk\n\n"
        "(attached, not read: big.txt, too large)\n\n(attached, not read: cat.png, not a text file)"
    )


async def test_a_text_attachment_over_the_message_limit_is_cut_to_fit_and_the_user_told(redis, fake):
    source = "".join(f"print('line {n}')\n" for n in range(300))
    async with adapter(redis, fake, discord_settings(limits={"max_message_chars": 1000})):
        data = fake.message("What does this do?", files=(("big.py", "text/x-python", source.encode()),))
        await fake.dispatch("MESSAGE_CREATE", data)
        jobs = await jobs_for(redis, int(data["id"]))
        [told] = await fake.wait_for(lambda: fake.replies_to(int(data["id"])))
    text = jobs[f"discord:{data['id']}"].text
    question, attached = text.split("\n\n", 1)
    heading, kept = attached.split("\n", 1)
    assert question == "What does this do?"
    assert heading == f"--- big.py (cut: first {len(kept):,} of {len(source.strip()):,} characters) ---"
    assert source.startswith(kept + "\n")  # whole lines
    assert 1000 - len("print('line 299')\n") < len(text) <= 1000  # the room is filled
    assert told.text == CUT_NOTICE.format(files="big.py", limit=1000)


async def test_a_message_of_only_an_image_or_a_sticker_is_ignored_unless_meant_for_the_bot(redis, fake):
    async with adapter(redis, fake, discord_settings()):
        picture = fake.message("", files=(("cat.png", "image/png", b"\x89PNG"),))
        sticker = fake.message("", stickers=("wave",))
        await fake.dispatch("MESSAGE_CREATE", picture)
        await fake.dispatch("MESSAGE_CREATE", sticker)
        asked = fake.message(f"<@{BOT.id}>", mentions=(BOT,), files=(("cat.png", "image/png", b"\x89PNG"),))
        await fake.dispatch("MESSAGE_CREATE", asked)
        [told] = await fake.wait_for(lambda: fake.replies_to(int(asked["id"])))
    # Delivery of `asked` came after the two earlier events were handled: neither got an answer.
    assert told.text == NOT_READABLE
    assert fake.replies_to(int(picture["id"])) == [] and fake.replies_to(int(sticker["id"])) == []
    assert await queued_jobs(redis) == {}


async def test_in_thread_channels_the_answer_goes_in_a_thread_opened_on_the_message(redis, fake, tiny_engine):
    settings = discord_settings(thread_channels=[GENERAL])
    long_question = "Which fruits are blue, and why are so few of them? " * 4
    async with adapter(redis, fake, settings), running_worker(redis, tiny_engine, settings):
        message_id = await say(fake, long_question)
        [opened] = await fake.wait_for(lambda: fake.requests("POST", f"/channels/{GENERAL}/messages/{message_id}/threads"))
        first = await final_event(redis, message_id)
        await fake.wait_for(lambda: fake.replies_to(message_id))
        # Inside the thread, a message is that thread's conversation: no new thread.
        follow_up = await say(fake, "And red ones?", channel_id=message_id)
        await final_event(redis, follow_up)
        await fake.wait_for(lambda: fake.replies_to(follow_up))
    name = opened.body["name"]  # from the message, cut at a word within Discord's 100 characters
    assert name.startswith("Which fruits are blue, and why are so few of them? Which") and name.endswith("…")
    assert len(name) <= 81 and not name.removesuffix("…").endswith(" ")
    assert len(fake.requests("POST", f"/channels/{message_id}/messages/{follow_up}/threads")) == 0
    assert {m.channel_id for m in fake.replies_to(message_id) + fake.replies_to(follow_up)} == {message_id}
    assert first.conversation == f"discord:{message_id}"
    exchanges = await history.load_exchanges(redis, f"discord:{message_id}")
    assert [e.user.text for e in exchanges] == [f"Alice: {long_question.strip()}", "Alice: And red ones?"]
    assert await history.load_exchanges(redis, f"discord:{GENERAL}") == []


async def test_in_thread_channels_a_message_refused_for_its_own_text_opens_no_thread_and_reads_no_file(redis, fake):
    settings = discord_settings(thread_channels=[GENERAL], limits={"max_message_chars": 100})
    async with adapter(redis, fake, settings):
        too_long = fake.message("Why? " * 30, files=(("notes.md", "text/markdown", b"# Notes"),))
        await fake.dispatch("MESSAGE_CREATE", too_long)
        empty = await say(fake, f"<@{BOT.id}>", mentions=(BOT,))
        [refused] = await fake.wait_for(lambda: fake.replies_to(int(too_long["id"])))
        [emptied] = await fake.wait_for(lambda: fake.replies_to(empty))
    assert refused.text == "Your message is 149 characters long; the limit is 100."
    assert emptied.text == EMPTY_MESSAGE
    assert {refused.channel_id, emptied.channel_id} == {GENERAL}
    assert fake.requests("POST", f"/channels/{GENERAL}/messages/") == []  # no thread opened
    assert fake.requests("GET", "/attachments/") == []
    assert await queued_jobs(redis) == {}


async def test_in_thread_channels_a_message_the_queue_refuses_leaves_no_thread_behind(redis, fake):
    settings = discord_settings(thread_channels=[GENERAL], limits={"max_queued_per_author": 1})
    async with adapter(redis, fake, settings):
        first = await say(fake, "A first question")
        await jobs_for(redis, first)
        second = await say(fake, "A second question")  # Alice has one waiting already
        [refused] = await fake.wait_for(lambda: fake.replies_to(second))
    assert refused.channel_id == GENERAL and refused.text.startswith("You already have 1 messages waiting")
    assert list(fake.threads) == [first]
    assert len(fake.requests("DELETE", f"/channels/{second}")) == 1


# --- /reset -----------------------------------------------------------------------------


def ephemeral_answer(callback) -> str:
    """The text of an interaction callback that answers with a message only its user sees."""
    assert callback.body["type"] == 4  # CHANNEL_MESSAGE_WITH_SOURCE
    assert callback.body["data"]["flags"] == 64  # EPHEMERAL
    return callback.body["data"]["content"]


async def test_reset_forgets_the_channel_and_answers_ephemerally(redis, fake, tiny_engine):
    settings = discord_settings()
    async with adapter(redis, fake, settings), running_worker(redis, tiny_engine, settings):
        await ask(fake, redis, COLOUR_CONVERSATION[0])
        assert len(await history.load_exchanges(redis, f"discord:{GENERAL}")) == 1

        interaction = fake.interaction("reset")
        await fake.dispatch("INTERACTION_CREATE", interaction)
        [callback] = await fake.wait_for(lambda: fake.requests("POST", f"/interactions/{interaction['id']}/"))
        assert ephemeral_answer(callback) == RESET_DONE
        assert await history.load_exchanges(redis, f"discord:{GENERAL}") == []

        # A message after the reset starts from nothing: its prompt held no earlier turn.
        await ask(fake, redis, "What is my favorite fruit?")
    [exchange] = await history.load_exchanges(redis, f"discord:{GENERAL}")
    assert exchange.user.text == "Alice: What is my favorite fruit?"

    # The commands are published to the configured guild only; the global list is emptied.
    [guild_sync] = fake.requests("PUT", f"/applications/{APPLICATION_ID}/guilds/{GUILD_ID}/commands")
    assert [command["name"] for command in guild_sync.body] == ["reset", "persona"]
    persona = guild_sync.body[1]
    # Shown by default to members with Manage Channels only, and never in DMs.
    assert int(persona["default_member_permissions"]) == MANAGE_CHANNELS and persona["dm_permission"] is False
    assert [(option["name"], option["type"]) for option in persona["options"]] == [("set", 1), ("show", 1), ("clear", 1)]
    [text] = persona["options"][0]["options"]
    assert (text["name"], text["type"], text["required"]) == ("text", 3, True)
    [global_sync] = fake.requests("PUT", f"/applications/{APPLICATION_ID}/commands")
    assert global_sync.body == []


async def remember_an_exchange(redis, channel_id: int) -> str:
    """Give the channel's conversation one exchange of history; returns the conversation."""
    conversation = f"discord:{channel_id}"
    for role, text in (("user", "hi"), ("assistant", "hello")):
        await redis.rpush(keys.turns(conversation), Turn(role=role, text=text, tokens=3).model_dump_json())
    return conversation


async def test_reset_roles_refuse_others(redis, fake):
    conversation = await remember_an_exchange(redis, GENERAL)
    async with adapter(redis, fake, discord_settings(reset_roles=[ADMIN_ROLE])):
        refused = fake.interaction("reset", user=ALICE)
        await fake.dispatch("INTERACTION_CREATE", refused)
        [callback] = await fake.wait_for(lambda: fake.requests("POST", f"/interactions/{refused['id']}/"))
        assert ephemeral_answer(callback) == RESET_REFUSED
        assert len(await history.load_exchanges(redis, conversation)) == 1

        allowed = fake.interaction("reset", user=ADMIN)
        await fake.dispatch("INTERACTION_CREATE", allowed)
        [callback] = await fake.wait_for(lambda: fake.requests("POST", f"/interactions/{allowed['id']}/"))
        assert ephemeral_answer(callback) == RESET_DONE
        assert await history.load_exchanges(redis, conversation) == []


@pytest.mark.parametrize(
    ("overrides", "used", "answer"),
    [
        ({"roles": [MEMBER_ROLE]}, dict(user=BOB), RESET_REFUSED),  # no reset_roles: the roles that may chat
        ({}, dict(channel_id=CLOSED), RESET_REFUSED),
        ({"guilds": [], "allow_dms": False}, dict(channel_id=DM_CHANNEL), RESET_REFUSED),
        ({"roles": [MEMBER_ROLE]}, dict(channel_id=THREAD), RESET_DONE),  # a thread counts as its parent channel
        ({}, dict(channel_id=QUIET), RESET_DONE),  # a command needs no mention in a mention-only channel
    ],
    ids=["role", "channel", "dm", "thread", "mention-only"],
)
async def test_reset_follows_the_rules_of_chatting(redis, fake, overrides, used, answer):
    conversation = await remember_an_exchange(redis, used.get("channel_id", GENERAL))
    async with adapter(redis, fake, discord_settings(**overrides)):
        interaction = fake.interaction("reset", **used)
        await fake.dispatch("INTERACTION_CREATE", interaction)
        [callback] = await fake.wait_for(lambda: fake.requests("POST", f"/interactions/{interaction['id']}/"))
    assert ephemeral_answer(callback) == answer
    assert len(await history.load_exchanges(redis, conversation)) == (1 if answer == RESET_REFUSED else 0)


# --- /persona ---------------------------------------------------------------------------

GENERAL_SCOPE = Scope(platform="discord", workspace=str(GUILD_ID), channel=str(GENERAL))


async def persona(fake: FakeDiscord, action: str, user=ADMIN, channel_id=GENERAL, **strings: str) -> str:
    """Use `/persona <action>` as Discord sends it; returns the bot's ephemeral answer."""
    interaction = fake.interaction("persona", user=user, channel_id=channel_id, options=[subcommand(action, **strings)])
    await fake.dispatch("INTERACTION_CREATE", interaction)
    [callback] = await fake.wait_for(lambda: fake.requests("POST", f"/interactions/{interaction['id']}/"))
    assert callback.body["data"]["allowed_mentions"]["parse"] == []  # a persona's @everyone pings nobody
    return ephemeral_answer(callback)


async def test_persona_set_show_and_clear_change_the_prompt_of_the_channel_and_its_threads(redis, fake, tiny_model):
    settings = discord_settings()
    engine = recording_engine(tiny_model, settings)
    poet, pirate = "You are a calm poet. Answer in verse.", "You are a pirate. Answer like one."
    async with adapter(redis, fake, settings), running_worker(redis, engine, settings):
        assert await persona(fake, "set", text=f"  {poet}  ") == PERSONA_SET.format(channel=f"<#{GENERAL}>", chars=len(poet))
        assert await persona(fake, "show") == f"The persona of <#{GENERAL}> ({SOURCES['run time']}):\n{poet}"
        await ask(fake, redis, "Who are you?")
        await ask(fake, redis, "And who are you here?", channel_id=THREAD)  # a thread follows its channel

        # From a thread, the commands work on its parent channel.
        assert await persona(fake, "show", channel_id=THREAD) == f"The persona of <#{GENERAL}> ({SOURCES['run time']}):\n{poet}"
        await persona(fake, "set", channel_id=THREAD, text=pirate)
        assert await Personas(redis, settings).system_prompt(GENERAL_SCOPE) == SystemPrompt(pirate, "run time")
        await ask(fake, redis, "Who are you now?")

        cleared = PERSONA_CLEARED.format(channel=f"<#{GENERAL}>", now=NOW["global system_prompt"])
        assert await persona(fake, "clear", channel_id=THREAD) == cleared
        assert await persona(fake, "clear") == PERSONA_NONE_SET.format(channel=f"<#{GENERAL}>", now=NOW["global system_prompt"])
        assert (await persona(fake, "show")).endswith(f"({SOURCES['global system_prompt']}):\n{settings.system_prompt.strip()}")
        await ask(fake, redis, "And after the clear?")

    prompts = [engine.tokenizer.decode(prompt) for prompt in engine.prompts]
    assert len(prompts) == 4
    assert poet in prompts[0] and poet in prompts[1]
    assert pirate in prompts[2] and poet not in prompts[2]
    assert settings.system_prompt.strip() in prompts[3] and pirate not in prompts[3]


async def test_persona_show_names_config_personas_and_cuts_a_long_one_to_one_message(redis, fake):
    settings = tiny_settings(
        discord={"guilds": [GUILD_ID], "channels": [GENERAL]},
        personas=[{"platform": "discord", "workspace": str(GUILD_ID), "system_prompt": "You are the server's helper."}],
    )
    async with adapter(redis, fake, settings):
        assert await persona(fake, "show") == f"The persona of <#{GENERAL}> ({SOURCES['workspace in config.yaml']}):\nYou are the server's helper."
        long = " ".join(f"Rule {n}: be kind." for n in range(150))
        assert 2 * LIMIT > len(long) > LIMIT
        await persona(fake, "set", text=long)
        shown = await persona(fake, "show")
        assert len(shown) == LIMIT
        head, text = shown.split("\n", 1)
        text, note = text.rsplit("\n", 1)
        assert long.startswith(text) and note == f"(cut: the first {len(text):,} of {len(long):,} characters)"
        assert await persona(fake, "clear") == PERSONA_CLEARED.format(channel=f"<#{GENERAL}>", now=NOW["workspace in config.yaml"])
        # A persona the store refuses is answered with its reason, and the channel keeps what it had.
        too_long = await persona(fake, "set", text="x" * (MAX_PERSONA_CHARS + 1))
        assert too_long == f"A persona can be at most {MAX_PERSONA_CHARS:,} characters long (this one has {MAX_PERSONA_CHARS + 1:,})."
        assert (await Personas(redis, settings).system_prompt(GENERAL_SCOPE)).source == "workspace in config.yaml"


async def test_persona_is_refused_to_members_without_manage_channels(redis, fake):
    settings = discord_settings()
    await Personas(redis, settings).set(GENERAL_SCOPE, "You are a pirate.")
    async with adapter(redis, fake, settings):
        for action, strings in (("set", {"text": "You are a parrot."}), ("show", {}), ("clear", {})):
            assert await persona(fake, action, user=CAROL, **strings) == PERSONA_REFUSED
            assert await persona(fake, action, user=CAROL, channel_id=THREAD, **strings) == PERSONA_REFUSED
    assert await Personas(redis, settings).system_prompt(GENERAL_SCOPE) == SystemPrompt("You are a pirate.", "run time")


async def test_persona_answers_in_a_sentence_when_redis_refuses_or_outside_a_server(redis, fake, monkeypatch):
    from redis.exceptions import ResponseError

    async def full(*args, **kwargs):
        raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")

    # Published globally (no guilds listed): Discord keeps a guild-only command out of DMs; should one come, it is refused.
    settings = discord_settings(guilds=[])
    async with adapter(redis, fake, settings):
        monkeypatch.setattr(redis, "hset", full)
        assert await persona(fake, "set", text="You are a pirate.") == PERSONA_FAILED
        assert await persona(fake, "show", channel_id=DM_CHANNEL) == PERSONA_NOT_HERE
    assert (await Personas(redis, settings).system_prompt(GENERAL_SCOPE)).source == "global system_prompt"


# --- delivery ---------------------------------------------------------------------------


async def publish(redis, message_id: int, kind: str, text: str, channel_id: int = GENERAL) -> None:
    job_id = f"discord:{message_id}"
    event = ReplyEvent(job_id=job_id, conversation=f"discord:{channel_id}", kind=kind, text=text, reply_to=reply_route(channel_id, message_id))
    await redis.xadd(reply_stream("discord", event.conversation), {"event": event.model_dump_json()})


async def test_a_slow_channel_never_delays_the_replies_of_another(redis, fake):
    fake.slow_channels.add(QUIET)  # Discord takes its time there (a rate-limit wait, a slow region)
    async with adapter(redis, fake, discord_settings()):
        await publish(redis, 7001, "final", "For the slow channel.", channel_id=QUIET)
        await publish(redis, 7002, "final", "For the general channel.")
        await shown_answer(fake, 7002, "For the general channel.")
        assert fake.replies_to(7001) == []  # still waiting on Discord
        fake.slow_channels.clear()
        await shown_answer(fake, 7001, "For the slow channel.")


async def test_a_long_reply_is_split_into_messages_of_at_most_2000_characters(redis, fake):
    text = "\n\n".join(f"Paragraph {n}: " + "word " * 120 for n in range(8))
    assert len(text) > 2 * LIMIT
    async with adapter(redis, fake, discord_settings()):
        await publish(redis, 4242, "final", text)
        messages = await shown_answer(fake, 4242, text)

    assert len(messages) >= 3 and all(len(m.text) <= LIMIT for m in messages)
    posts = fake.requests("POST", f"/channels/{GENERAL}/messages")
    assert [("message_reference" in p.body) for p in posts] == [True] + [False] * (len(posts) - 1)


async def test_a_reply_that_ends_shorter_than_its_partials_leaves_no_stale_messages(redis, fake):
    long_partial = "\n\n".join(f"Paragraph {n}: " + "word " * 120 for n in range(8))
    async with adapter(redis, fake, discord_settings()):
        await publish(redis, 4545, "partial", long_partial)
        await fake.wait_for(lambda: len(fake.replies_to(4545)) >= 3)
        await publish(redis, 4545, "error", "Sorry, the answer failed.")
        [message] = await shown_answer(fake, 4545, "Sorry, the answer failed.")
    assert len(fake.requests("DELETE", f"/channels/{GENERAL}/messages")) >= 2


async def test_streamed_edits_are_at_most_one_per_second_per_message(redis, fake):
    words = [f"word{n}" for n in range(60)]
    async with adapter(redis, fake, discord_settings()):
        for count in range(1, len(words)):
            await publish(redis, 4343, "partial", " ".join(words[:count]))
            await asyncio.sleep(0.05)
        await publish(redis, 4343, "final", " ".join(words))
        [message] = await shown_answer(fake, 4343, " ".join(words))

    assert len(message.times) >= 3  # the post and at least two edits
    gaps = [later - earlier for earlier, later in zip(message.times, message.times[1:])]
    assert min(gaps) >= 0.99, gaps


POSTS = "/channels/{channel_id}/messages"
MESSAGE = "/channels/{channel_id}/messages/{message_id}"


async def test_a_reply_read_but_not_delivered_is_delivered_once_after_a_restart(redis, fake):
    settings = discord_settings()
    fake.fail_next("POST", POSTS, "ratelimited", retry_after_s=60)  # discord.py waits, nothing posted
    async with adapter(redis, fake, settings):
        await publish(redis, 4444, "final", "The answer that was in flight.")
        await fake.wait_for(lambda: [e for e in fake.exchanges if e.status == 429])
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5  # a wait for a rate limit is not waited out on stopping
    pending = await redis.xpending(reply_stream("discord", f"discord:{GENERAL}"), GROUP)
    assert pending["pending"] == 1 and pending["consumers"][0]["name"] == CONSUMER

    await publish(redis, 4545, "final", "An answer published while no adapter ran.")
    async with adapter(redis, fake, settings):
        await shown_answer(fake, 4444, "The answer that was in flight.")
        await shown_answer(fake, 4545, "An answer published while no adapter ran.")
    async with adapter(redis, fake, settings):
        # Delivery keeps stream order: once this marker is shown, a second delivery of the
        # earlier replies would have been shown too (no timed wait guards the negative).
        await publish(redis, 4646, "final", "Marker.")
        await shown_answer(fake, 4646, "Marker.")

    assert len(fake.requests("POST", f"/channels/{GENERAL}/messages")) == 3
    assert (await redis.xpending(reply_stream("discord", f"discord:{GENERAL}"), GROUP))["pending"] == 0


async def test_an_adapter_stopped_while_discord_answers_a_post_records_it_and_the_next_one_edits_it(redis, fake):
    """Defect 11: stopping (SIGTERM) cancelled a post Discord had accepted before its id was recorded; the
    next process posted the answer again."""
    settings = discord_settings()
    fake.slow_next("POST", POSTS, seconds=2)  # the message exists at once; its id comes back late
    async with adapter(redis, fake, settings):
        await publish(redis, 4848, "partial", "The answer")
        await fake.wait_for(lambda: fake.replies_to(4848))
    async with adapter(redis, fake, settings):
        await publish(redis, 4848, "final", "The answer is 42.")
        [message] = await shown_answer(fake, 4848, "The answer is 42.")
    assert len(fake.requests("POST", f"/channels/{GENERAL}/messages")) == 1


@pytest.mark.parametrize("failure", ["http_500", "http_503", "ratelimited", "reset"])
async def test_a_final_that_discord_fails_once_is_shown_all_the_same_and_posted_once(redis, fake, failure):
    async with adapter(redis, fake, discord_settings()):
        await publish(redis, 4949, "partial", "The answer")
        await fake.wait_for(lambda: fake.replies_to(4949))
        fake.fail_next("PATCH", MESSAGE, failure)
        await publish(redis, 4949, "final", "The answer is 42.")
        [message] = await shown_answer(fake, 4949, "The answer is 42.")
        assert message.button("stop") is None  # the final edit took the Stop button away
    assert [(method, failed) for method, _, failed in fake.failed] == [("PATCH", failure)]
    assert len(fake.requests("POST", f"/channels/{GENERAL}/messages")) == 1


@pytest.mark.parametrize("failure", ["http_500", "http_503", "ratelimited", "reset"])
async def test_a_post_that_discord_fails_once_is_shown_once(redis, fake, failure):
    async with adapter(redis, fake, discord_settings()):
        fake.fail_next("POST", POSTS, failure)
        await publish(redis, 5050, "final", "Shown once.")
        await shown_answer(fake, 5050, "Shown once.")
    assert len(fake.replies_to(5050)) == 1
    assert [(method, failed) for method, _, failed in fake.failed] == [("POST", failure)]


async def test_a_channel_the_bot_may_not_post_in_does_not_stop_delivery(redis, fake):
    fake.forbidden.add(QUIET)
    async with adapter(redis, fake, discord_settings()) as running:
        await publish(redis, 4646, "final", "Nobody will read this.", channel_id=QUIET)
        await publish(redis, 4747, "final", "But this arrives.")
        await shown_answer(fake, 4747, "But this arrives.")
        assert not running.done()
    assert len(fake.requests("POST", f"/channels/{QUIET}/messages")) == 2  # the answer, then the apology


# --- start-up ---------------------------------------------------------------------------


async def test_a_missing_token_fails_at_start_naming_it(redis):
    with pytest.raises(ConfigError, match="DISCORD_TOKEN"):
        await run_discord(discord_settings(), Secrets(), redis)


async def test_a_rejected_token_fails_at_start_naming_it(redis, fake):
    with pytest.raises(ConfigError, match="DISCORD_TOKEN"):
        await run_discord(discord_settings(), Secrets(values={"DISCORD_TOKEN": "wrong-token-000000"}), redis)


async def test_the_adapter_reports_its_gateway_connection_in_the_process_health(redis, fake):
    from service.observability import HEALTH

    async with adapter(redis, fake, discord_settings()):
        deadline = time.monotonic() + 10
        while await HEALTH.report() != {"discord": "ok"}:
            assert time.monotonic() < deadline, await HEALTH.report()
            await asyncio.sleep(0.02)
    assert "discord" not in HEALTH.checks  # a stopped adapter takes its check away
