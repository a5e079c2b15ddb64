"""`chatbot doctor`: each check against a real redis-server, the fake Slack and Discord, and the tiny model."""

from __future__ import annotations

import asyncio
import io

import discord
import pytest
from aiohttp import web

from bot.discord.doctor import FOR_THREADS, NEEDED, invite_url
from chatbot.doctor import diagnose
from engine.doctor import budget_check, model_checks
from service.config import Secrets, Settings
from service.doctor import APP_CONFIG_TOKEN, redis_checks
from service.redis_client import connect
from service.redis_server import RedisServer, free_port
from tests.conftest import tiny_settings
from tests.fakes.discord_server import APPLICATION_ID, GUILD_ID, FakeDiscord
from tests.fakes.local_server import serve_locally, shut_down
from tests.fakes.slack_server import FakeSlack
from tests.test_cli import ROOT, chatbot

pytestmark = pytest.mark.timeout(120)

DISCORD_TOKEN = "discord-doctor-token"
SECRETS = Secrets(
    values={
        "SLACK_BOT_TOKEN": "xoxb-doctor", "SLACK_APP_TOKEN": "xapp-doctor", APP_CONFIG_TOKEN: "xoxe.xoxp-doctor",
        "DISCORD_TOKEN": DISCORD_TOKEN,
    }
)
MESSAGE_CONTENT = discord.ApplicationFlags(gateway_message_content=True).value
NEEDED_ONLY = discord.Permissions(**dict.fromkeys(NEEDED, True)).value


@pytest.fixture
async def slack():
    fake = await FakeSlack().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def discord_fake(monkeypatch):
    fake = await FakeDiscord(DISCORD_TOKEN).start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.rest_base)
    # A live bot's application: Message Content on, in one server with exactly what the adapter needs.
    fake.application_flags = MESSAGE_CONTENT
    fake.guild_permissions = {GUILD_ID: NEEDED_ONLY}
    yield fake
    await fake.stop()


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test alone, whose configuration it may spoil."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


async def doctor(settings: Settings, redis_url: str | None, slack: FakeSlack, secrets: Secrets = SECRETS) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = await diagnose(slack.serving(settings), secrets, redis_url, out)
    return code, out.getvalue().splitlines()


def line(lines: list[str], name: str) -> str:
    [found] = [text for text in lines if text[9:].startswith(name + ":")]
    return found


async def test_all_ok_exits_0(redis_server, slack, discord_fake):
    code, lines = await doctor(tiny_settings(), redis_server.url, slack)
    assert code == 0, "\n".join(lines)
    assert [text[:8].strip() for text in lines[:-1]] == ["ok"] * (len(lines) - 1), "\n".join(lines)
    assert lines[-1] == f"all {len(lines) - 1} checks passed or skipped"
    assert line(lines, "redis memory").startswith("ok       redis memory: maxmemory-policy is noeviction")
    assert line(lines, "redis persistence") == "ok       redis persistence: appendonly yes"
    assert line(lines, "model budget") == (
        "ok       model budget: max_prompt_tokens 384 + max_new_tokens 24 = 408 fit sequence_length 512"
    )
    assert line(lines, "slack scopes") == "ok       slack scopes: the bot token has the manifest's 9 scopes"
    assert line(lines, "slack socket mode") == "ok       slack socket mode: apps.connections.open accepts SLACK_APP_TOKEN"
    assert line(lines, "slack events") == "ok       slack events: the app is subscribed to the manifest's 4 bot events"
    assert line(lines, "slack commands") == "ok       slack commands: the app has /reset and /persona"
    assert line(lines, "discord intents") == "ok       discord intents: Message Content intent enabled"
    assert line(lines, f"discord server Test guild ({GUILD_ID})").startswith("ok ")
    # The manifest's export was asked with the configuration token, for the bot's own app.
    [export] = slack.calls_to("apps.manifest.export")
    assert export.token == "xoxe.xoxp-doctor" and export.body["app_id"] == "A0APP"


async def test_platforms_without_tokens_are_skipped(redis_server, slack):
    code, lines = await doctor(tiny_settings(), redis_server.url, slack, Secrets())
    assert code == 0
    assert "skipped  slack: neither SLACK_BOT_TOKEN nor SLACK_CLIENT_ID is set" in lines and "skipped  discord: DISCORD_TOKEN is not set" in lines
    assert not slack.calls


async def test_a_missing_slack_scope_is_named(redis_server, slack, discord_fake):
    slack.granted_scopes.remove("assistant:write")
    code, lines = await doctor(tiny_settings(), redis_server.url, slack)
    assert code == 1 and lines[-1].startswith("1 of ")
    assert line(lines, "slack scopes") == (
        "FAIL     slack scopes: the bot token lacks assistant:write. Fix: add them under OAuth & Permissions -> "
        "Bot Token Scopes (or update the app from slack_manifest.yaml), then reinstall the app after adding: assistant:write"
    )


async def test_an_invalid_slack_token(redis_server, slack, discord_fake):
    slack.invalid_tokens.add("xoxb-doctor")
    code, lines = await doctor(tiny_settings(), redis_server.url, slack)
    assert code == 1
    assert line(lines, "slack bot token").startswith("FAIL     slack bot token: auth.test refused it (invalid_auth). Fix: copy")
    assert not [text for text in lines if text[9:].startswith(("slack scopes", "slack events"))]  # nothing more to ask
    assert "xoxb-doctor" not in "\n".join(lines)


async def test_slack_events_and_commands_compared_with_the_manifest(redis_server, slack, discord_fake):
    slack.app_manifest["settings"]["event_subscriptions"]["bot_events"].remove("message.im")
    slack.app_manifest["features"]["slash_commands"] = [{"command": "/reset", "description": "Forget"}]
    code, lines = await doctor(tiny_settings(), redis_server.url, slack)
    assert code == 1
    assert line(lines, "slack events").startswith("FAIL     slack events: the app is not subscribed to message.im. Fix: ")
    assert line(lines, "slack commands").startswith("FAIL     slack commands: the app has no /persona. Fix: ")

    code, lines = await doctor(tiny_settings(), redis_server.url, slack, Secrets(values={"SLACK_BOT_TOKEN": "xoxb-doctor"}))
    assert line(lines, "slack events") == (
        f"skipped  slack events: set {APP_CONFIG_TOKEN} to compare the app's events and commands with the manifest"
    )
    # Socket Mode (the default mode) needs the app-level token.
    assert line(lines, "slack tokens") == (
        "FAIL     slack tokens: missing environment variable(s): SLACK_APP_TOKEN (slack.mode socket). "
        "Fix: export them before `chatbot slack`"
    )


async def test_discord_without_the_message_content_intent(redis_server, slack, discord_fake):
    discord_fake.application_flags = 0
    code, lines = await doctor(tiny_settings(), redis_server.url, slack)
    assert code == 1
    assert line(lines, "discord intents").startswith(
        "FAIL     discord intents: the Message Content intent is off: Discord refuses the connection. Fix: Developer Portal"
    )
    discord_fake.application_flags = discord.ApplicationFlags(gateway_message_content_limited=True).value
    code, lines = await doctor(tiny_settings(), redis_server.url, slack)
    assert code == 0 and line(lines, "discord intents").startswith("ok       discord intents: Message Content intent enabled (below")


async def test_a_server_where_the_bot_lacks_a_permission(redis_server, slack, discord_fake):
    lacking = discord.Permissions(NEEDED_ONLY)
    lacking.send_messages_in_threads = False
    discord_fake.guild_permissions = {GUILD_ID: lacking.value, 555: discord.Permissions(administrator=True).value}
    code, lines = await doctor(tiny_settings(), redis_server.url, slack)
    assert code == 1
    invite = f"https://discord.com/oauth2/authorize?client_id={APPLICATION_ID}&scope=bot+applications.commands&permissions=328565066752"
    assert line(lines, f"discord server Test guild ({GUILD_ID})") == (
        f"FAIL     discord server Test guild ({GUILD_ID}): the bot lacks Send Messages in Threads. "
        f"Fix: grant them to the bot's role in Server Settings -> Roles, or invite the bot again with {invite}"
    )
    assert line(lines, "discord server Guild 555 (555)").startswith("ok ")  # an administrator has every permission

    # With thread channels the bot also opens and deletes threads; a server it should be in and is not is named.
    settings = tiny_settings(discord={"thread_channels": [200], "guilds": [GUILD_ID, 777]})
    discord_fake.guild_permissions = {GUILD_ID: NEEDED_ONLY}
    code, lines = await doctor(settings, redis_server.url, slack)
    assert code == 1
    assert f"the bot lacks {', '.join(FOR_THREADS.values())}." in line(lines, f"discord server Test guild ({GUILD_ID})")
    assert line(lines, "discord server 777").startswith("FAIL     discord server 777: the bot is not in this server of discord.guilds")


async def test_a_wrong_discord_token(redis_server, slack, discord_fake):
    secrets = Secrets(values={**SECRETS.values, "DISCORD_TOKEN": "not-the-token"})
    code, lines = await doctor(tiny_settings(), redis_server.url, slack, secrets)
    assert code == 1
    assert line(lines, "discord token").startswith("FAIL     discord token: Discord refused DISCORD_TOKEN (401). Fix: ")


def test_the_invite_link_is_the_one_documented():
    documented = (ROOT / "docs" / "discord.md").read_text().replace("APPLICATION_ID", str(APPLICATION_ID))
    assert invite_url(APPLICATION_ID) in documented


async def test_redis_that_evicts_and_keeps_nothing_is_reported_with_the_fix(private_redis):
    client = connect(private_redis.url)
    await client.config_set("maxmemory-policy", "allkeys-lru")
    await client.config_set("appendonly", "no")
    await client.config_set("save", "")
    await client.aclose()
    lines = [check.line() for check in await redis_checks(private_redis.url)]
    assert lines == [
        f"ok       redis: reachable at 127.0.0.1:{private_redis.port}",
        "FAIL     redis memory: maxmemory-policy is allkeys-lru: a full Redis may silently evict queued jobs and histories. "
        "Fix: CONFIG SET maxmemory-policy noeviction, and in redis.conf: maxmemory-policy noeviction",
        'FAIL     redis persistence: off (appendonly no, save ""): a Redis restart loses queued messages, leases and histories. '
        "Fix: CONFIG SET appendonly yes, then CONFIG REWRITE (or in redis.conf: appendonly yes, appendfsync everysec)",
    ]


async def test_redis_without_config_and_redis_unreachable(private_redis):
    client = connect(private_redis.url)
    await client.acl_setuser("doctor", enabled=True, passwords=["+hunter2"], keys="*", channels="*", commands=["+@all", "-config"])
    await client.aclose()
    url = f"redis://doctor:hunter2@127.0.0.1:{private_redis.port}/0"
    lines = [check.line() for check in await redis_checks(url)]
    assert lines[0] == f"ok       redis: reachable at 127.0.0.1:{private_redis.port}"
    assert lines[1].startswith("skipped  redis memory: could not be checked: CONFIG GET refused (")
    assert lines[2].startswith("skipped  redis persistence: could not be checked: CONFIG GET refused (")
    assert "hunter2" not in "\n".join(lines)

    port = free_port()
    [unreachable] = await redis_checks(f"redis://127.0.0.1:{port}/0")
    assert unreachable.line().startswith(f"FAIL     redis: cannot reach 127.0.0.1:{port} (")


def test_a_budget_that_does_not_fit():
    settings = tiny_settings(generation={"max_new_tokens": 200})
    assert budget_check(settings.model, settings.generation).line() == (
        "FAIL     model budget: model.max_prompt_tokens 384 + generation.max_new_tokens 200 = 584 exceed "
        "model.sequence_length 512: after a full prompt an answer stops at 128 tokens. Fix: lower generation.max_new_tokens "
        "to 128 or model.max_prompt_tokens to 312 (or raise model.sequence_length, where the model allows)"
    )
    settings = tiny_settings(generation={"max_new_tokens": 500})
    assert "Fix: lower generation.max_new_tokens to 128 (or raise" in budget_check(settings.model, settings.generation).line()


def test_system_prompts_and_model_ids():
    long = "Answer briefly. " * 200
    settings = tiny_settings(personas=[{"platform": "slack", "channel": "C0LONG", "system_prompt": long}])
    lines = [check.line() for check in model_checks(settings, None)]
    assert lines[1] == "ok       model: embedded:tiny-llama loads (backend transformers)"
    assert lines[2].startswith(
        "FAIL     system prompts: persona (slack channel C0LONG): model.max_prompt_tokens (384) leaves no room for a message"
    )
    lines = [check.line() for check in model_checks(tiny_settings(), None)]
    assert lines[2].startswith("ok       system prompts: system_prompt and 0 persona(s) leave room for a message in max_prompt_tokens 384; "
        "the largest, system_prompt, takes ")

    lines = [check.line() for check in model_checks(tiny_settings(model={"id": "/nowhere/llama"}), None)]
    assert lines[1] == "FAIL     model: model.id /nowhere/llama: no such folder. Fix: set model.id to the folder holding the model"
    lines = [check.line() for check in model_checks(tiny_settings(model={"id": "embedded:nothing"}), None)]
    assert lines[1].startswith("FAIL     model: model.id embedded:nothing does not load: ValueError: unknown embedded model")


async def test_chatbot_doctor_command(redis_server, tmp_path):
    no_tokens = dict.fromkeys(("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "DISCORD_TOKEN", APP_CONFIG_TOKEN), "")
    answers = {"CHATBOT__GENERATION__MAX_NEW_TOKENS": "24"}  # what fits the tiny model's 512 tokens after a full prompt
    code, out, err = await chatbot(redis_server.url, tmp_path, "doctor", environment={**no_tokens, **answers})
    assert code == 0, out + err
    assert f"ok       redis: reachable at 127.0.0.1:{redis_server.port}" in out.splitlines()
    assert "skipped  discord: DISCORD_TOKEN is not set" in out.splitlines()

    code, out, err = await chatbot(
        redis_server.url, tmp_path, "doctor", environment={**no_tokens, "CHATBOT__GENERATION__MAX_NEW_TOKENS": "200"}
    )
    assert code == 1 and "FAIL     model budget: " in out and out.splitlines()[-1].startswith("1 of "), out + err


async def test_the_model_server_of_backend_openai():
    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "llama", "object": "model", "max_model_len": 256}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner, port = await serve_locally(app)
    settings = tiny_settings(
        model={"backend": "openai"}, queue={"step_timeout_s": 10, "visibility_timeout_s": 60},
        openai={"base_url": f"http://127.0.0.1:{port}/v1", "served_model": "llama", "timeout_s": 5},
    )
    try:
        # In a thread, as `chatbot doctor` runs it: the health check blocks, and this server runs in this loop.
        lines = [check.line() for check in await asyncio.to_thread(model_checks, settings, None)]
        assert lines[-1].startswith(
            "FAIL     model server: model server's max_model_len (256) is below model.sequence_length (512)"
        )
        settings.openai.served_model = "other"
        lines = [check.line() for check in await asyncio.to_thread(model_checks, settings, None)]
        assert lines[-1].startswith("FAIL     model server: model server does not serve 'other' (it serves llama). Fix: ")
    finally:
        await shut_down(runner, set())
