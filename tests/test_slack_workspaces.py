"""Many workspaces: installs through Slack's OAuth flow, each workspace answered with its own token,
uninstalls and revoked tokens, installations encrypted in Redis. Bolt's real HTTP adapter against the
fake Slack (tests/fakes/slack_server.py), real Redis, the real worker with the tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import yaml
from cryptography.fernet import Fernet

from bot.slack.app import build_app, serve, web_client
from bot.slack.installations import RedisInstallationStore, installation_key, installation_keys
from bot.slack.workspaces import BOT_SCOPES
from chatbot.doctor import diagnose
from contract import history, keys
from contract.jobs import ReplyEvent
from contract.usage import report
from service.config import ConfigError, Secrets
from service.tasks import cancel_until_done
from tests.conftest import running_worker, shards_held, tiny_settings
from tests.fakes.slack_server import APP_ID, AUTHORIZE_URL, CLIENT_ID, CLIENT_SECRET, FakeSlack
from tests.test_slack import SIGNING_SECRET, answer_shown, job_keys, new_ts, publish, slack_settings

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
INSTALLATION_KEY = Fernet.generate_key().decode()
SECRETS = Secrets(values={
    "SLACK_CLIENT_ID": CLIENT_ID, "SLACK_CLIENT_SECRET": CLIENT_SECRET, "SLACK_INSTALLATION_KEY": INSTALLATION_KEY,
    "SLACK_SIGNING_SECRET": SIGNING_SECRET,
})
ONE, TWO = "T1ONE", "T2TWO"
DMS = {ONE: "D1ONE", TWO: "D2TWO"}  # each workspace's DM with the bot
ALICE = "U1ALICE"
STATE_COOKIE = "slack-app-oauth-state"  # bolt's


@pytest.fixture
async def fake():
    fake = await FakeSlack(signing_secret=SIGNING_SECRET, retry_delays_s=(0.0, 0.2, 0.5)).start()
    fake.channel_teams.update({dm: team for team, dm in DMS.items()})
    yield fake
    await fake.stop()


@contextlib.asynccontextmanager
async def adapter(fake: FakeSlack, redis, settings):
    """The real adapter (`serve`) with many workspaces, its Web API client (no token) pointed at the fake."""
    bot = build_app(settings, SECRETS, redis, client=web_client(None, base_url=fake.api_url))
    fake.request_url = f"{base(settings)}/slack/events"
    task = asyncio.create_task(serve(bot, settings, SECRETS, redis))
    deadline = time.monotonic() + 10
    while True:
        if task.done():
            task.result()  # the adapter failed: show why
        with contextlib.suppress(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as session, session.get(f"{base(settings)}/healthz") as response:
                if response.status == 200:
                    break
        assert time.monotonic() < deadline, "the adapter did not start"
        await asyncio.sleep(0.02)
    await shards_held(redis, "slack")
    try:
        yield bot
    finally:
        await cancel_until_done([task])


def base(settings) -> str:
    return f"http://127.0.0.1:{settings.slack.http_port}"


async def begin_install(fake: FakeSlack, settings, team: str) -> dict[str, str]:
    """A person in `team` opens the install link and allows the app in Slack: the query of Slack's redirect."""
    async with aiohttp.ClientSession() as browser:
        async with browser.get(f"{base(settings)}/slack/install", allow_redirects=False) as started:
            assert started.status == 302, await started.text()
            consent = started.headers["Location"]
            cookie = started.cookies[STATE_COOKIE]
    assert consent.startswith(AUTHORIZE_URL + "?") and cookie["secure"] and cookie["httponly"]
    allowed = fake.approve(consent, team)
    assert allowed["state"] == cookie.value  # bolt checks that the redirect comes back to the same browser
    return allowed


async def redirect(settings, query: dict[str, str]) -> int:
    """Slack sends the person's browser back to the adapter, with the state cookie it set (a secure
    cookie: sent here by hand, since this test's HTTP is not https)."""
    cookie = {"Cookie": f"{STATE_COOKIE}={query['state']}"}
    async with aiohttp.ClientSession() as browser:
        async with browser.get(f"{base(settings)}/slack/oauth_redirect", params=query, headers=cookie) as back:
            await back.read()
            return back.status


async def install(fake: FakeSlack, settings, team: str) -> int:
    return await redirect(settings, await begin_install(fake, settings, team))


async def send(fake: FakeSlack, team: str, event: dict) -> None:
    """An event from `team` over HTTP, as Slack sends it; acknowledged at once (200)."""
    payload = {
        "token": "legacy-verification-token", "team_id": team, "api_app_id": APP_ID, "type": "event_callback",
        "event_id": f"Ev{uuid.uuid4().hex[:10].upper()}", "event_time": int(time.time()),
        "authorizations": [{"team_id": team, "user_id": f"U0BOT{team}", "is_bot": True}], "event": event,
    }
    [answer] = await fake.deliver(payload)
    assert answer.status == 200, answer.body


async def send_dm(fake: FakeSlack, team: str, text: str) -> str:
    """A DM to the bot in `team`; the job id it should make."""
    ts = new_ts()
    await send(fake, team, {"type": "message", "channel": DMS[team], "channel_type": "im", "user": ALICE, "text": text,
                            "ts": ts, "event_ts": ts})
    return f"slack:{DMS[team]}-{ts}"


def token_of(fake: FakeSlack, team: str) -> set[str]:
    return {token for token, installed_in in fake.installed.items() if installed_in == team}


async def redis_values(redis) -> list[str]:
    """Every value in Redis as text."""
    read = {"string": redis.get, "hash": redis.hvals, "list": lambda key: redis.lrange(key, 0, -1), "set": redis.smembers,
            "zset": lambda key: redis.zrange(key, 0, -1), "stream": redis.xrange}
    values = []
    for key in await redis.keys("*"):
        values.append(str(await read[await redis.type(key)](key)))
    return values


# --- tests ------------------------------------------------------------------------------------


async def test_two_workspaces_install_and_each_is_answered_with_its_own_token(redis, fake, tiny_engine):
    settings = slack_settings()
    async with adapter(fake, redis, settings), running_worker(redis, tiny_engine, settings):
        for team in (ONE, TWO):
            assert await install(fake, settings, team) == 200  # bolt's page: "Thank you!", with a link back to Slack
        jobs = {team: await send_dm(fake, team, f"Hello from {team}") for team in (ONE, TWO)}
        for team, job_id in jobs.items():
            await answer_shown(fake, redis, job_id, before=0, channel=DMS[team])

    # Each workspace's calls used its own bot token, and only its own (the fake refuses another's channels).
    for team in (ONE, TWO):
        used = {call.token for call in fake.calls if DMS[team] in (call.body.get("channel"), call.body.get("channel_id"))}
        assert used == token_of(fake, team) and len(used) == 1
    # Usage keeps the workspaces apart (contract/usage.py's workspace dimension).
    by_workspace = {row.name: row.messages for row in await report(redis, "workspace", 1)}
    assert by_workspace == {f"slack:{ONE}": 1, f"slack:{TWO}": 1}
    # At rest, no token: the installations are encrypted, and each install's state was used up.
    values = await redis_values(redis)
    assert not [value for value in values if "xoxb-" in value]
    assert await redis.exists(installation_key(None, ONE), installation_key(None, TWO)) == 2
    assert await redis.keys(keys.PREFIX + "slack:oauth-state:*") == []


async def test_a_replayed_or_forged_redirect_installs_nothing(redis, fake):
    settings = slack_settings()
    async with adapter(fake, redis, settings):
        allowed = await begin_install(fake, settings, ONE)
        assert await redirect(settings, allowed) == 200
        replayed = await redirect(settings, allowed)
        forged = await redirect(settings, {"code": fake.approve(f"{AUTHORIZE_URL}?client_id={CLIENT_ID}&scope=chat:write", TWO)["code"],
                                           "state": "made-up"})
    assert (replayed, forged) == (401, 401)  # bolt: invalid_state, the state is valid once and must be issued
    assert await redis.exists(installation_key(None, TWO)) == 0
    assert len(fake.calls_to("oauth.v2.access")) == 1


async def test_uninstalled_or_revoked_workspaces_are_forgotten_and_not_answered(redis, fake, caplog):
    settings = slack_settings()
    async with adapter(fake, redis, settings):  # no worker: what matters is what is queued
        for team in (ONE, TWO):
            await install(fake, settings, team)
        await send(fake, ONE, {"type": "app_home_opened", "user": ALICE, "channel": DMS[ONE], "tab": "messages",
                               "event_ts": new_ts()})
        await fake.wait_for(lambda: fake.suggested)
        assert await redis.exists(keys.slack_prompts_set(ONE, ALICE))

        await send(fake, ONE, fake.uninstall(ONE))
        assert await redis.exists(installation_key(None, ONE)) == 0
        assert not await redis.exists(keys.slack_prompts_set(ONE, ALICE))  # the workspace's flags went with it
        calls = len(fake.calls)
        await send_dm(fake, ONE, "Still there?")  # Slack would not send it; bolt finds no installation
        assert await job_keys(redis) == []
        await asyncio.sleep(0.3)  # nothing goes on after the acknowledgement either
        assert [call.method for call in fake.calls[calls:]] == []
        # An answer still on its way to the uninstalled workspace is dropped, with the reason in the log.
        thread = new_ts()
        reply_to = {"channel": DMS[ONE], "thread_ts": thread, "team": ONE, "user": ALICE}
        await publish(redis, ReplyEvent(job_id=f"slack:{DMS[ONE]}-{thread}", conversation=f"slack:{DMS[ONE]}:{thread}",
                                        kind="final", text="Too late.", reply_to=reply_to))
        await fake.wait_for(lambda: any("not installed in workspace T1ONE" in r.getMessage() + str(r.exc_info) for r in caplog.records))
        assert [call.method for call in fake.calls[calls:]] == []

        answered = await send_dm(fake, TWO, "And here?")  # the other workspace goes on
        assert await job_keys(redis) == [f"chatbot:job:{answered}"]

        await send(fake, TWO, fake.revoke_bot(TWO))
        assert await redis.exists(installation_key(None, TWO)) == 0
        await send_dm(fake, TWO, "Revoked?")
        assert await job_keys(redis) == [f"chatbot:job:{answered}"]


async def test_an_old_key_still_reads_and_each_installation_moves_to_the_new_key(redis):
    from slack_sdk.oauth.installation_store import Installation

    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    await RedisInstallationStore(redis, installation_keys(old)).async_save(
        Installation(app_id=APP_ID, team_id=ONE, bot_token="xoxb-secret", bot_id="B1", bot_user_id="U1", user_id=ALICE)
    )
    rotating = RedisInstallationStore(redis, installation_keys(f"{new}, {old}"))
    assert (await rotating.async_find_bot(enterprise_id=None, team_id=ONE)).bot_token == "xoxb-secret"
    assert (await RedisInstallationStore(redis, installation_keys(new)).async_find_bot(enterprise_id=None, team_id=ONE)).bot_token == "xoxb-secret"
    assert await RedisInstallationStore(redis, installation_keys(old)).async_find_bot(enterprise_id=None, team_id=ONE) is None
    assert "xoxb-" not in await redis.get(installation_key(None, ONE))


async def test_many_workspaces_need_their_three_secrets_and_http_mode(redis):
    only_id = Secrets(values={"SLACK_CLIENT_ID": CLIENT_ID, "SLACK_SIGNING_SECRET": SIGNING_SECRET})
    with pytest.raises(ConfigError, match="SLACK_CLIENT_SECRET, SLACK_INSTALLATION_KEY"):
        build_app(slack_settings(), only_id, redis)
    with pytest.raises(ConfigError, match="slack.mode http"):
        build_app(tiny_settings(slack={"mode": "socket"}), SECRETS, redis)
    bad_key = Secrets(values={**SECRETS.values, "SLACK_INSTALLATION_KEY": "not-a-fernet-key"})
    with pytest.raises(ConfigError, match="not a Fernet key") as refused:
        build_app(slack_settings(), bad_key, redis)
    assert "not-a-fernet-key" not in str(refused.value)


def test_installs_ask_for_the_manifests_scopes():
    manifest = yaml.safe_load((ROOT / "slack_manifest.yaml").read_text())
    assert sorted(BOT_SCOPES) == sorted(manifest["oauth_config"]["scopes"]["bot"])


async def test_two_adapter_replicas_behind_a_load_balancer_serve_both_workspaces_once(redis, fake, tiny_engine):
    """HTTP mode scaled out: events of two workspaces spread over two adapter processes' listeners (as a load
    balancer would), installs shared through Redis; each message is answered exactly once, in its workspace."""
    first, second = slack_settings(), slack_settings()
    async with adapter(fake, redis, first), adapter(fake, redis, second), running_worker(redis, tiny_engine, first):
        await install(fake, first, ONE)
        await install(fake, second, TWO)  # each replica reads the other's installs from Redis
        sent = []
        for n in range(4):  # (Alice has at most limits.max_queued_per_author messages waiting)
            team, replica = (ONE, TWO)[n % 2], (first, second)[n // 2 % 2]
            fake.request_url = f"{base(replica)}/slack/events"
            sent.append((team, await send_dm(fake, team, f"Question {n} from {team}")))
        # The answers as history keeps them (delivered reply events are trimmed from the streams).
        answers = {team: [] for team in (ONE, TWO)}
        for team, job_id in sent:
            conversation = "slack:" + job_id.removeprefix("slack:").replace("-", ":", 1)
            [exchange] = await asyncio.wait_for(exchanges_of(redis, conversation), 60)
            answers[team].append(exchange.assistant.text)
        for team in (ONE, TWO):
            await fake.wait_for(lambda team=team: sorted(m.text for m in fake.messages_in(DMS[team])) == sorted(answers[team]))
        await asyncio.sleep(0.5)  # a second copy from the other replica would have come by now
    for team in (ONE, TWO):  # once each: no reply posted by both replicas, none in the other workspace
        assert sorted(m.text for m in fake.messages_in(DMS[team])) == sorted(answers[team])
        used = {call.token for call in fake.calls if DMS[team] in (call.body.get("channel"), call.body.get("channel_id"))}
        assert used == token_of(fake, team)


async def exchanges_of(redis, conversation: str):
    while not (exchanges := await history.load_exchanges(redis, conversation)):
        await asyncio.sleep(0.05)
    return exchanges


async def test_doctor_checks_each_installed_workspace(redis, redis_server, fake):
    settings = slack_settings()
    async with adapter(fake, redis, settings):
        assert await doctor_lines(settings, redis_server.url, fake) == [
            "ok       slack app: many workspaces: the OAuth credentials and the installation key are set",
            "ok       slack workspaces: no workspace has installed the app yet: share <adapter>/slack/install",
        ]
        for team in (ONE, TWO):
            await install(fake, settings, team)
    fake.invalid_tokens |= token_of(fake, TWO)  # revoked while no adapter ran: the service never heard of it
    lines = await doctor_lines(settings, redis_server.url, fake)
    assert lines[0].startswith("ok       slack app:") and len(lines) == 3  # workspaces in the order Redis lists them
    assert any(text.startswith(f"ok       slack workspace {ONE}: installed, the bot token has the manifest's") for text in lines)
    assert any(text.startswith(f"FAIL     slack workspace {TWO}: auth.test refused its bot token (invalid_auth)") for text in lines)
    partial = Secrets(values={"SLACK_CLIENT_ID": CLIENT_ID})
    [refused] = await doctor_lines(settings, redis_server.url, fake, partial)
    assert refused.startswith("FAIL     slack app: missing environment variable(s): SLACK_CLIENT_SECRET, SLACK_INSTALLATION_KEY")


async def doctor_lines(settings, redis_url: str, fake: FakeSlack, secrets: Secrets = SECRETS) -> list[str]:
    """chatbot doctor's Slack lines."""
    out = io.StringIO()
    await diagnose(fake.serving(settings), secrets, redis_url, out)
    return [text for text in out.getvalue().splitlines() if text[9:].startswith("slack")]
