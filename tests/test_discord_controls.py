"""Stop and Regenerate on Discord: the buttons on answers, clicked through discord.py's gateway code against
the fake Discord, with a real worker and Redis."""

from __future__ import annotations

import pytest

from bot.discord.controls import REGENERATING
from contract import history, keys
from contract.controls import NOT_YOURS, ONLY_THE_LATEST, STOPPING
from engine.worker import STOPPED_NOTE
from tests import test_discord
from tests.conftest import engine_for, reply_events, running_worker, tiny_settings
from tests.conftest import final_event as job_final
from tests.fakes.discord_server import (
    ADMIN,
    ALICE,
    DAVE,
    GENERAL,
    GUILD_ID,
    QUIET,
    BotMessage,
    Call,
    FakeDiscord,
    FakeUser,
)
from tests.test_controls import slow_engine
from tests.test_discord import adapter, ask, ephemeral_answer, final_event, say, shown_answer

pytestmark = pytest.mark.timeout(120)
fake = test_discord.fake  # the fake Discord, with discord.py pointed at it


def controls_settings(**overrides):
    wanted = {"guilds": [GUILD_ID], "channels": [GENERAL, QUIET], "mention_only_channels": [QUIET]}
    return tiny_settings(discord=wanted, **overrides)


def long_answers():
    """Answers that stream for seconds with the slow engine: long enough to be stopped mid-way."""
    return controls_settings(model={"max_prompt_tokens": 100}, generation={"max_new_tokens": 400})


async def click(fake: FakeDiscord, message: BotMessage, custom_id: str, user: FakeUser = ALICE) -> tuple[dict, Call]:
    """Click a button of a bot message as `user`; returns the interaction and the bot's answer to it."""
    interaction = fake.click(message.id, custom_id, user)
    await fake.dispatch("INTERACTION_CREATE", interaction)
    [callback] = await fake.wait_for(lambda: fake.requests("POST", f"/interactions/{interaction['id']}/"))
    return interaction, callback


async def streaming(fake: FakeDiscord, question: int) -> BotMessage:
    """The bot's answer to `question` once it shows, still streaming, with its Stop button."""
    return await fake.wait_for(lambda: next((m for m in fake.replies_to(question) if m.button("stop:")), None))


async def test_the_asker_stops_an_answer_mid_way(redis, fake, tiny_model):
    settings = long_answers()
    async with adapter(redis, fake, settings), running_worker(redis, slow_engine(tiny_model, settings), settings):
        question = await say(fake, "Write a long answer.")
        answer = await streaming(fake, question)
        stop = answer.button("stop:")
        assert (stop["label"], stop["custom_id"]) == ("Stop", f"stop:discord:{question}")
        assert answer.button("regenerate:") is None  # not while it streams

        _, callback = await click(fake, answer, stop["custom_id"])
        assert ephemeral_answer(callback) == STOPPING
        stopped = await final_event(redis, question, timeout=20)
        assert stopped.text.endswith(STOPPED_NOTE)
        # The message keeps what was written, says it was stopped, and trades Stop for Regenerate.
        await fake.wait_for(lambda: fake.replies_to(question)[-1].button("regenerate:"))
    [message] = fake.replies_to(question)
    assert message.id == answer.id and message.text == stopped.text
    assert message.button("stop:") is None


async def test_only_the_asker_or_a_member_who_manages_messages_may_stop(redis, fake, tiny_model):
    settings = long_answers()
    async with adapter(redis, fake, settings), running_worker(redis, slow_engine(tiny_model, settings), settings):
        question = await say(fake, "Write a long answer.")
        answer = await streaming(fake, question)
        custom_id = answer.button("stop:")["custom_id"]

        _, refused = await click(fake, answer, custom_id, user=DAVE)  # a member without Manage Messages
        assert ephemeral_answer(refused) == NOT_YOURS
        assert not await redis.exists(keys.stop(f"discord:{question}"))

        _, allowed = await click(fake, answer, custom_id, user=ADMIN)  # Manage Messages in the channel
        assert ephemeral_answer(allowed) == STOPPING
        stopped = await final_event(redis, question, timeout=20)
        await fake.wait_for(lambda: fake.replies_to(question)[-1].text == stopped.text)
    assert stopped.text.endswith(STOPPED_NOTE)


async def test_regenerate_edits_the_answer_in_place_even_after_a_restart(redis, fake, tiny_model):
    settings = controls_settings(generation={"do_sample": True, "temperature": 1.5})
    async with running_worker(redis, engine_for(tiny_model, settings), settings):
        async with adapter(redis, fake, settings):
            question, _ = await ask(fake, redis, "Tell me a story.")
        [answer] = fake.replies_to(question)
        regenerate = answer.button("regenerate:")
        assert (regenerate["label"], regenerate["custom_id"]) == ("Regenerate", f"regenerate:discord:{question}")
        versions, posts = len(answer.contents), len(fake.requests("POST", f"/channels/{GENERAL}/messages"))

        async with adapter(redis, fake, settings):  # a new process: the button still works
            interaction, callback = await click(fake, answer, regenerate["custom_id"])
            assert ephemeral_answer(callback) == REGENERATING
            new_job = f"discord:regenerate:{interaction['id']}"
            again = await job_final(redis, "discord", new_job)
            [shown] = await shown_answer(fake, question, again.text)

    # The same message, edited into the new answer; nothing new posted.
    assert again.kind == "final" and shown.id == answer.id and len(shown.contents) > versions
    assert len(fake.requests("POST", f"/channels/{GENERAL}/messages")) == posts
    assert shown.button("regenerate:")["custom_id"] == f"regenerate:{new_job}"
    [exchange] = await history.load_exchanges(redis, f"discord:{GENERAL}")
    assert exchange.user.text == "Alice: Tell me a story."
    assert (exchange.assistant.job, exchange.assistant.text) == (new_job, again.text)


async def test_only_the_latest_answer_and_only_its_asker_may_regenerate(redis, fake, tiny_model):
    settings = controls_settings()
    async with adapter(redis, fake, settings), running_worker(redis, engine_for(tiny_model, settings), settings):
        older, _ = await ask(fake, redis, "Hello there.")
        latest, _ = await ask(fake, redis, "And who are you?")
        [old_answer], [new_answer] = fake.replies_to(older), fake.replies_to(latest)

        _, refused = await click(fake, old_answer, old_answer.button("regenerate:")["custom_id"])
        assert ephemeral_answer(refused) == ONLY_THE_LATEST
        _, refused = await click(fake, new_answer, new_answer.button("regenerate:")["custom_id"], user=DAVE)
        assert ephemeral_answer(refused) == NOT_YOURS
    exchanges = await history.load_exchanges(redis, f"discord:{GENERAL}")
    assert [e.assistant.job for e in exchanges] == [f"discord:{older}", f"discord:{latest}"]  # unchanged


async def test_a_retried_click_regenerates_and_answers_once(redis, fake, tiny_model):
    settings = controls_settings()
    async with adapter(redis, fake, settings), running_worker(redis, engine_for(tiny_model, settings), settings):
        question, _ = await ask(fake, redis, "Tell me a story.")
        [answer] = fake.replies_to(question)
        interaction, callback = await click(fake, answer, answer.button("regenerate:")["custom_id"])
        await fake.dispatch("INTERACTION_CREATE", interaction)  # the same click delivered again
        new_job = f"discord:regenerate:{interaction['id']}"
        again = await job_final(redis, "discord", new_job)
        await shown_answer(fake, question, again.text)

    assert ephemeral_answer(callback) == REGENERATING
    assert len(fake.requests("POST", f"/interactions/{interaction['id']}/")) == 1
    assert [e.kind for e in await reply_events(redis, "discord", new_job)].count("final") == 1
    [exchange] = await history.load_exchanges(redis, f"discord:{GENERAL}")
    assert exchange.assistant.job == new_job
