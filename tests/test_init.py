"""`chatbot init` as a newcomer runs it, in a process of its own: against the fake Discord and the fake
Slack, then the doctor, then `chatbot run` reading .env and answering one message."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import discord
import pytest

from bot.discord.doctor import NEEDED, invite_url
from tests.conftest import started
from tests.fakes.chatbot_against_fakes import COMMAND as AGAINST_FAKES
from tests.fakes.discord_server import APPLICATION_ID, GENERAL, GUILD_ID, FakeDiscord
from tests.fakes.slack_server import APP_ID, AUTHORIZE_URL, MANIFEST, FakeSlack
from tests.test_discord import say
from tests.test_slack import DM, dm, event_callback

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
DISCORD_TOKEN = "init-discord-token-0123"
CONFIG_TOKEN = "xoxe.xoxp-init-config"
BOT_TOKEN = "xoxb-init-bot-0123"
APP_TOKEN = "xapp-init-app-0123"
MESSAGE_CONTENT = discord.ApplicationFlags(gateway_message_content=True).value


@pytest.fixture
async def discord_fake():
    fake = await FakeDiscord(DISCORD_TOKEN).start()
    fake.application_flags = MESSAGE_CONTENT
    fake.guild_permissions = {GUILD_ID: discord.Permissions(**dict.fromkeys(NEEDED, True)).value}
    yield fake
    await fake.stop()


@pytest.fixture
async def slack_fake():
    fake = await FakeSlack().start()
    yield fake
    await fake.stop()


@pytest.fixture
def newcomer(tmp_path, redis_server, discord_fake, slack_fake) -> dict[str, str]:
    """The environment of someone who ran `make demo`: no token anywhere, the project's .env still absent."""
    tokens = ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_APP_ID", "SLACK_APP_CONFIG_TOKEN")
    return {
        **{name: value for name, value in os.environ.items() if name not in tokens},
        "CHATBOT_ENV_FILE": str(tmp_path / ".env"),
        "CHATBOT_CONFIG": str(tmp_path / "none.yaml"),
        "CHATBOT__RUN_DIR": str(tmp_path / "run"),
        "REDIS_URL": redis_server.url,
        "FAKE_DISCORD": discord_fake.cdn_base,
        "CHATBOT__SLACK__API_URL": slack_fake.api_url,
        "CHATBOT__MODEL__ID": "embedded:tiny-llama",
        "CHATBOT__MODEL__SEQUENCE_LENGTH": "512",
        "CHATBOT__MODEL__MAX_PROMPT_TOKENS": "384",
        "CHATBOT__GENERATION__MAX_NEW_TOKENS": "16",
        "CHATBOT__QUEUE__ADAPTER_LEASE_S": "1.5",  # replies delivered 1 s after the start, not 10
    }


async def chatbot(environment: dict[str, str], *args: str, typed: str = "") -> tuple[int, str]:
    """`chatbot args` with `typed` on its standard input (not a terminal); exit status and all it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, *AGAINST_FAKES, *args, cwd=ROOT, env=environment,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(typed.encode()), 120)
    return process.returncode, out.decode()


@contextlib.contextmanager
def running(environment: dict[str, str], log: Path):
    """`chatbot run` until the block ends (then SIGTERM, as docker stop)."""
    process = started([sys.executable, *AGAINST_FAKES, "run"], environment, log, cwd=ROOT)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def lines_of(out: str, name: str) -> list[str]:
    return [line for line in out.splitlines() if line[9:].startswith(name + ":")]


def snapshot(path: Path) -> tuple[bytes, int, int]:
    status = path.stat()
    return path.read_bytes(), status.st_mtime_ns, stat.S_IMODE(status.st_mode)


async def test_discord_from_a_pasted_token_to_an_answer_in_the_server(newcomer, discord_fake, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("# kept as it is\nexport DISCORD_TOKEN=an-old-token\nOTHER=1\n")
    env_file.chmod(0o644)
    code, out = await chatbot(newcomer, "init", "discord", typed=DISCORD_TOKEN + "\n")
    assert code == 0, out
    assert DISCORD_TOKEN not in out and "an-old-token" not in out
    # The env file's old token was checked first, refused, and the pasted one replaced it.
    refused, valid, doctor = lines_of(out, "discord token")
    assert refused.startswith("FAIL     discord token: Discord refused DISCORD_TOKEN (401). Fix:")
    assert valid.startswith("ok       discord token: valid: bot") and doctor == valid
    assert lines_of(out, "discord intents")[0].startswith("ok       discord intents: Message Content intent enabled")
    assert invite_url(APPLICATION_ID) in out
    assert f"Saved DISCORD_TOKEN in {env_file} (readable by you only)." in out
    assert "chatbot doctor:" in out and "checks passed or skipped" in out
    assert env_file.read_text() == f"# kept as it is\nDISCORD_TOKEN={DISCORD_TOKEN}\nOTHER=1\n"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600

    before = snapshot(env_file)
    code, out = await chatbot(newcomer, "init", "--no-input", "discord")
    assert code == 0, out
    assert f"{env_file} already holds these." in out and snapshot(env_file) == before

    with running(newcomer, tmp_path / "run.log"):
        await discord_fake.wait_for(lambda: discord_fake.identified, timeout=60)
        asked = await say(discord_fake, "Hello from the new server")
        answer = await discord_fake.wait_for(
            lambda: [m for m in discord_fake.bot_messages.values() if m.reply_to == asked and m.channel_id == GENERAL], timeout=60
        )
    assert answer[0].text.strip()


async def test_a_discord_token_that_cannot_work_is_one_sentence_and_nothing_is_written(newcomer, discord_fake, tmp_path):
    discord_fake.application_flags = 0
    code, out = await chatbot({**newcomer, "DISCORD_TOKEN": DISCORD_TOKEN}, "init", "--no-input", "discord")
    assert code == 1
    [intents] = lines_of(out, "discord intents")
    assert intents.startswith("FAIL     discord intents: the Message Content intent is off: Discord refuses the connection. Fix: Developer Portal")
    assert not (tmp_path / ".env").exists() and "Traceback" not in out

    code, out = await chatbot({**newcomer, "DISCORD_TOKEN": "mistyped"}, "init", "--no-input", "discord")
    assert code == 1 and out.strip().splitlines()[-1].startswith("FAIL     discord token: Discord refused DISCORD_TOKEN (401). Fix:")
    assert not (tmp_path / ".env").exists()

    code, out = await chatbot(newcomer, "init", "--no-input", "discord")
    assert code == 1 and "DISCORD_TOKEN is not set: export it, or run `chatbot init discord` at a terminal" in out
    code, out = await chatbot(newcomer, "init", "--no-input")
    assert code == 2 and "name the platform to set up: `chatbot init discord`" in out


async def test_slack_app_created_from_the_manifest_then_a_dm_answered(newcomer, slack_fake, tmp_path):
    typed = f"{CONFIG_TOKEN}\n{BOT_TOKEN}\n{APP_TOKEN}\n"
    code, out = await chatbot(newcomer, "init", "slack", typed=typed)
    assert code == 0, out
    assert slack_fake.created_apps == [MANIFEST]
    [created] = slack_fake.calls_to("apps.manifest.create")
    assert created.token == CONFIG_TOKEN
    assert f"Install it in your workspace: open\n  {AUTHORIZE_URL}?client_id=" in out
    assert f"Created the Slack app {APP_ID} (its id and signing secret saved in {tmp_path / '.env'})." in out
    assert f"https://api.slack.com/apps/{APP_ID}/oauth" in out and f"https://api.slack.com/apps/{APP_ID}/general" in out
    for name in ("slack bot token", "slack scopes", "slack socket mode", "slack events", "slack commands"):
        assert lines_of(out, name)[0].startswith("ok "), out
    assert not {CONFIG_TOKEN, BOT_TOKEN, APP_TOKEN} & set(out.split())
    env_file = tmp_path / ".env"
    written = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert written == {"SLACK_APP_ID": APP_ID, "SLACK_SIGNING_SECRET": "fake-signing-secret", "SLACK_BOT_TOKEN": BOT_TOKEN,
                       "SLACK_APP_TOKEN": APP_TOKEN}
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600

    before = snapshot(env_file)
    code, out = await chatbot(newcomer, "init", "slack")  # nothing typed: nothing needed
    assert code == 0, out
    assert len(slack_fake.created_apps) == 1 and snapshot(env_file) == before

    with running(newcomer, tmp_path / "run.log"):
        await slack_fake.wait_for(lambda: slack_fake.connections, timeout=60)
        event = dm("Hello from Slack")
        envelope = await slack_fake.send_envelope("events_api", event_callback(event))
        await slack_fake.wait_for(lambda: slack_fake.ack_of(envelope))
        answers = await slack_fake.wait_for(lambda: [m for m in slack_fake.messages_in(DM) if m.text.strip()], timeout=60)
    assert answers[0].thread_ts == event["ts"]


async def test_a_slack_token_without_a_scope_or_a_refused_configuration_token(newcomer, slack_fake, tmp_path):
    slack_fake.granted_scopes.remove("im:history")
    code, out = await chatbot(
        {**newcomer, "SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_APP_TOKEN": APP_TOKEN}, "init", "--no-input", "slack"
    )
    assert code == 1
    [scopes] = lines_of(out, "slack scopes")
    assert scopes.startswith("FAIL     slack scopes: the bot token lacks im:history. Fix: add them under OAuth & Permissions")
    assert not (tmp_path / ".env").exists()

    code, out = await chatbot({**newcomer, "SLACK_APP_CONFIG_TOKEN": "xoxb-not-a-config-token"}, "init", "--no-input", "slack")
    assert code == 1 and not slack_fake.created_apps and not (tmp_path / ".env").exists()
    [refused] = lines_of(out, "slack app")
    assert refused.startswith("FAIL     slack app: apps.manifest.create refused the app configuration token (not_allowed_token_type)")


async def test_a_token_pasted_at_a_terminal_is_not_shown(newcomer, tmp_path):
    """At a real terminal (a pseudo-terminal here) the token is read with echo off."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, *AGAINST_FAKES, "init", "discord"], cwd=ROOT, env=newcomer,
        stdin=follower, stdout=follower, stderr=follower, start_new_session=True,
    )
    os.close(follower)
    shown, typed = b"", False
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the fake Discord answers meanwhile
            if select.select([leader], [], [], 0)[0]:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # the process ended: its terminal is gone
                    break
                shown += chunk
            if not typed and b"Paste the bot token" in shown:
                os.write(leader, DISCORD_TOKEN.encode() + b"\n")
                typed = True
        assert process.wait(30) == 0, shown.decode()
    finally:
        process.kill()
        process.wait(10)
        os.close(leader)
    assert DISCORD_TOKEN.encode() not in shown and b"ok       discord token: valid" in shown
    assert (tmp_path / ".env").read_text() == f"DISCORD_TOKEN={DISCORD_TOKEN}\n"
