"""Slack's /persona end to end, offline: the command through bolt against the fake Slack, real Redis,
and the real worker answering the channel's next message with the persona in its prompt."""

from __future__ import annotations

import asyncio
import json
import logging

from bot.slack import handlers
from bot.slack.handlers import (
    PERSONA_FAILED,
    PERSONA_NO_ADMINS,
    PERSONA_NOT_ADMIN,
    PERSONA_SET,
    persona_cleared,
    persona_shown,
    persona_usage,
)
from contract import keys
from contract.personas import MAX_PERSONA_CHARS, Personas
from service.config import Persona
from tests.conftest import running_worker
from tests.fakes.slack_server import BOT_USER_ID, TEAM_ID, FakeSlack
from tests.test_personas import recording_engine
from tests.test_slack import (
    ALICE,
    CHANNEL,
    DM,
    adapter,
    answer_shown,
    fake,
    new_ts,
    redis_refusing_writes,
    send_dm,
    send_event,
    slack_settings,
    slash_command,
)

__all__ = ["fake"]  # the fixture, shared with test_slack

BOB = "U2BOB"
PIRATE = "You are a pirate & a poet. Answer like one."


async def persona(fake: FakeSlack, text: str, channel: str = CHANNEL, user: str = ALICE) -> str:
    """`/persona <text>` as Slack sends it (its text HTML-escaped); the ephemeral answer, acknowledged within 3 s."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    name = "directmessage" if channel == DM else "general"
    answer = await fake.post(slash_command(channel, name, command="/persona", text=escaped, user=user), "application/x-www-form-urlencoded")
    assert answer.status == 200 and answer.seconds < 3, answer.body
    body = json.loads(answer.body)
    assert body["response_type"] == "ephemeral"
    return body["text"]


def mention(text: str, thread: str | None = None) -> dict:
    ts = new_ts()
    return {"type": "app_mention", "channel": CHANNEL, "user": ALICE, "text": f"<@{BOT_USER_ID}> {text}", "ts": ts,
            **({"thread_ts": thread} if thread else {})}


async def stored(redis) -> dict[str, str]:
    return await redis.hgetall(keys.PERSONAS)


async def test_an_admin_sets_shows_and_clears_a_channels_persona_and_the_worker_answers_with_it(redis, fake, tiny_model, caplog):
    caplog.set_level(logging.INFO, logger="bot.slack.handlers")
    settings = slack_settings(answer_mentions=True, admin_user_ids=[ALICE])
    engine = recording_engine(tiny_model, settings)
    async with adapter(fake, redis, settings), running_worker(redis, engine, settings):
        assert await persona(fake, f"set {PIRATE}") == PERSONA_SET
        assert await stored(redis) == {f"slack:{CHANNEL}": PIRATE}  # `&amp;` read back as `&`
        shown = await persona(fake, "show")
        assert shown == persona_shown(PIRATE, "run time") and "pirate &amp; a poet" in shown  # escaped for Slack

        first = mention("Who are you?")
        await send_event(fake, first)
        await answer_shown(fake, redis, f"slack:{CHANNEL}-{first['ts']}", before=0, channel=CHANNEL)
        prompt = engine.tokenizer.decode(engine.prompts[-1])
        assert PIRATE in prompt and settings.system_prompt not in prompt

        # A DM's channel has a persona of its own.
        assert await persona(fake, "set You are a gardener.", channel=DM) == PERSONA_SET
        asked = await send_dm(fake, "Who are you?")
        await answer_shown(fake, redis, asked.job_id, before=0)
        prompt = engine.tokenizer.decode(engine.prompts[-1])
        assert "You are a gardener." in prompt and "pirate" not in prompt

        assert await persona(fake, "clear") == persona_cleared(True, "global system_prompt")
        assert await persona(fake, "clear") == persona_cleared(False, "global system_prompt")
        assert await persona(fake, "show") == persona_shown(settings.system_prompt, "global system_prompt")
        assert await stored(redis) == {f"slack:{DM}": "You are a gardener."}

        later = mention("And now?")  # a new thread in the same channel
        await send_event(fake, later)
        await answer_shown(fake, redis, f"slack:{CHANNEL}-{later['ts']}", before=1, channel=CHANNEL)
        prompt = engine.tokenizer.decode(engine.prompts[-1])
        assert settings.system_prompt in prompt and "pirate" not in prompt
    assert fake.calls_to("chat.postEphemeral") == []  # every answer rode on the acknowledgement

    logged = [r for r in caplog.records if r.name == "bot.slack.handlers" and r.getMessage().startswith("persona")]
    assert [r.getMessage() for r in logged] == [
        "persona set", "persona shown", "persona set", "persona cleared", "persona cleared", "persona shown"
    ]
    first_set = logged[0]
    assert (first_set.user, first_set.channel, first_set.team, first_set.chars) == (ALICE, CHANNEL, TEAM_ID, len(PIRATE))
    assert [r.had_one for r in logged if r.getMessage() == "persona cleared"] == [True, False]
    assert not any("pirate" in str(r.__dict__) or "gardener" in str(r.__dict__) for r in logged)  # lengths, never text


async def test_show_and_clear_name_config_yaml_personas(redis, fake):
    settings = slack_settings(admin_user_ids=[ALICE]).model_copy(
        update={"personas": [Persona(platform="slack", workspace=TEAM_ID, system_prompt="You are the team's helper.")]}
    )
    async with adapter(fake, redis, settings, delivering=False):
        assert await persona(fake, "show") == persona_shown("You are the team's helper.", "workspace in config.yaml")
        assert await persona(fake, "set You are terse.") == PERSONA_SET
        assert await persona(fake, "show") == persona_shown("You are terse.", "run time")
        assert await persona(fake, "clear") == persona_cleared(True, "workspace in config.yaml")
    assert await stored(redis) == {}


async def test_a_non_admin_is_refused_and_nothing_is_stored(redis, fake, caplog):
    caplog.set_level(logging.INFO, logger="bot.slack.handlers")
    async with adapter(fake, redis, slack_settings(admin_user_ids=[ALICE]), delivering=False):
        for text in ("set You are a pirate.", "show", "clear", "nonsense"):
            assert await persona(fake, text, user=BOB) == PERSONA_NOT_ADMIN
    assert await stored(redis) == {}
    refused = [r for r in caplog.records if r.getMessage() == "persona command refused"]
    assert [(r.user, r.channel) for r in refused] == [(BOB, CHANNEL)] * 4
    assert not any("refuses everyone" in r.getMessage() for r in caplog.records)

    # No admins configured: everyone is refused, and the start says so once.
    async with adapter(fake, redis, slack_settings(), delivering=False):
        assert await persona(fake, "set You are a pirate.") == PERSONA_NO_ADMINS
    assert await stored(redis) == {}
    assert [r.getMessage() for r in caplog.records if "refuses everyone" in r.getMessage()] == [
        "/persona refuses everyone: slack.admin_user_ids is empty"
    ]


async def test_bad_usage_gets_the_usage_line_and_a_bad_persona_its_reason(redis, fake):
    async with adapter(fake, redis, slack_settings(admin_user_ids=[ALICE]), delivering=False):
        for text in ("", "sing", "show me", "clear everything", "setting x"):
            assert await persona(fake, text) == persona_usage("/persona")
        assert await persona(fake, "set   ") == "A persona cannot be empty: to go back to the default, clear it."
        too_long = "x" * (MAX_PERSONA_CHARS + 1)
        assert await persona(fake, f"set {too_long}") == (
            f"A persona can be at most {MAX_PERSONA_CHARS:,} characters long (this one has {MAX_PERSONA_CHARS + 1:,})."
        )
        assert await persona(fake, "SET\nYou are a pirate.\nAlways.") == PERSONA_SET  # a line break after the verb
    assert await stored(redis) == {f"slack:{CHANNEL}": "You are a pirate.\nAlways."}


async def test_redis_full_or_slow_gets_one_sentence_within_slacks_3_s(redis, fake, monkeypatch):
    async with adapter(fake, redis, slack_settings(admin_user_ids=[ALICE]), delivering=False):
        async with redis_refusing_writes(redis):
            assert await persona(fake, "set You are a pirate.") == PERSONA_FAILED
        assert await stored(redis) == {}

        async def stuck(self, scope):
            await asyncio.sleep(30)

        monkeypatch.setattr(handlers, "PERSONA_TIMEOUT_S", 0.2)
        monkeypatch.setattr(Personas, "system_prompt", stuck)
        assert await persona(fake, "show") == PERSONA_FAILED
