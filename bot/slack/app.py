"""The Slack adapter: bolt receives messages (Socket Mode or HTTP), the shared Delivery posts replies.

Socket Mode needs no public URL: the app opens a websocket to Slack with its app-level
token. HTTP mode serves Slack's signed requests on `slack.http_port`. One workspace uses
SLACK_BOT_TOKEN; many (bot/slack/workspaces.py) are installed through Slack's OAuth flow,
which needs HTTP mode.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from redis.asyncio import Redis
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from bot.delivery import Delivery
from bot.slack.budget import PacedSlack, SlackBudget
from bot.slack.controls import SlackControls
from bot.slack.dm_threads import DmThreads
from bot.slack.files import SlackFiles
from bot.slack.handlers import SlackListeners
from bot.slack.http import http_server
from bot.slack.messages import PLATFORM
from bot.slack.outbox import SlackOutbox
from bot.slack.sessions import AgentSessions
from bot.slack.status import ThreadStatus
from bot.slack.tokens import InstalledTokens, SingleToken
from bot.slack.workspaces import OAuthSecrets, forget_uninstalled, oauth_secrets, oauth_settings
from contract.feedback import EXCHANGE_TTL_S, FeedbackStore
from contract.intake import Intake
from contract.personas import Personas
from contract.pools import keep_answering_unserved
from service.config import ConfigError, Secrets, Settings
from service.observability import HEALTH
from service.tasks import until_first_ends

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class SlackTokens:
    bot: str | None  # None with many workspaces: each one's token is in the installation store
    app: str | None  # the app-level token (xapp-) that opens Socket Mode connections
    signing_secret: str | None  # verifies HTTP mode requests
    oauth: OAuthSecrets | None = None  # set: many workspaces


def slack_tokens(settings: Settings, secrets: Secrets) -> SlackTokens:
    """The tokens the configured mode needs; a missing one fails here, by name."""
    oauth = oauth_secrets(secrets)
    if oauth is not None:
        if settings.slack.mode != "http":
            raise ConfigError(
                "many workspaces (SLACK_CLIENT_ID) need slack.mode http: Slack sends installs back to /slack/oauth_redirect"
            )
        values = secrets.require("SLACK_SIGNING_SECRET")
        return SlackTokens(bot=None, app=None, signing_secret=values["SLACK_SIGNING_SECRET"], oauth=oauth)
    if settings.slack.mode == "socket":
        values = secrets.require("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN")
        return SlackTokens(bot=values["SLACK_BOT_TOKEN"], app=values["SLACK_APP_TOKEN"], signing_secret=None)
    values = secrets.require("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET")
    return SlackTokens(bot=values["SLACK_BOT_TOKEN"], app=None, signing_secret=values["SLACK_SIGNING_SECRET"])


def web_client(token: str | None, base_url: str) -> AsyncWebClient:
    # No retry handler: a 429 is handled by the rate budget (bot/slack/budget.py), which
    # pauses that workspace and method for every process instead of sleeping inside one call.
    return AsyncWebClient(token=token, base_url=base_url)


@dataclass(frozen=True)
class SlackBot:
    app: AsyncApp  # bolt, with our listeners
    outbox: SlackOutbox  # shared by the listeners and reply delivery: it knows the open streams
    status: ThreadStatus


def build_app(settings: Settings, secrets: Secrets, redis: Redis, client: AsyncWebClient | None = None) -> SlackBot:
    """The bolt app with our listeners; `client` replaces the Web API client (tests point one at a fake)."""
    tokens = slack_tokens(settings, secrets)
    oauth = oauth_settings(tokens.oauth, redis) if tokens.oauth else None
    app = AsyncApp(
        client=client or web_client(tokens.bot, settings.slack.api_url),  # without a token for many workspaces: each call names its own
        signing_secret=tokens.signing_secret or "",
        request_verification_enabled=tokens.signing_secret is not None,
        # Slack hears the acknowledgement only once the job is in Redis (or the person was told
        # that it could not be): a retried event then finds the job, and the job id makes it a no-op.
        process_before_response=True,
        # Many workspaces: bolt serves the install and authorizes each request with its workspace's token.
        oauth_settings=oauth,
    )
    if oauth is None:
        bot_tokens = SingleToken(tokens.bot)
    else:
        bot_tokens = InstalledTokens(oauth.installation_store)
        forget_uninstalled(app, bot_tokens, redis)
    slack = PacedSlack(app.client, SlackBudget(redis, settings.slack.rate_limits), bot_tokens)
    feedback = FeedbackStore(redis)
    status = ThreadStatus(redis, slack, settings.slack)
    sessions = AgentSessions(redis, slack)
    outbox = SlackOutbox(slack, settings.slack, sessions)
    intake = Intake(redis, settings.limits, settings.pools)
    files = SlackFiles(bot_tokens, app.client.base_url, settings.slack.file_max_bytes)
    dm_threads = DmThreads(redis, keep_s=max(settings.history.ttl_seconds, EXCHANGE_TTL_S))
    personas = Personas(redis, settings)  # the whole settings: `show` names config.yaml's personas too
    SlackListeners(slack, settings.slack, intake, outbox, status, feedback, files, dm_threads, personas, sessions).register(app)
    SlackControls(slack, settings.slack, intake, outbox, sessions).register(app)
    return SlackBot(app, outbox, status)


@asynccontextmanager
async def receiving(app: AsyncApp, settings: Settings, tokens: SlackTokens) -> AsyncIterator[None]:
    if settings.slack.mode == "http":
        async with http_server(app, settings.slack.http_port, tokens.signing_secret):
            yield
        return
    handler = AsyncSocketModeHandler(app, app_token=tokens.app)
    await handler.connect_async()
    log.info("connected to slack in socket mode")

    async def connected() -> str | None:
        return None if await handler.client.is_connected() else "the Socket Mode connection to Slack is down"

    try:
        with HEALTH.checking("slack", connected):
            yield
    finally:
        await handler.close_async()


async def serve(bot: SlackBot, settings: Settings, secrets: Secrets, redis: Redis) -> None:
    """Receive messages and deliver replies until cancelled."""
    tokens = slack_tokens(settings, secrets)
    delivery = Delivery(
        redis, PLATFORM, bot.outbox, settings.slack.edit_interval_s, settings.queue.adapter_lease_s, waiting=bot.status
    )
    async with receiving(bot.app, settings, tokens):
        await until_first_ends(
            delivery.run(), bot.status.keep_fresh(), keep_answering_unserved(redis, settings, delivery.shards.holder)
        )


async def run_slack(settings: Settings, secrets: Secrets, redis: Redis) -> None:
    await serve(build_app(settings, secrets, redis), settings, secrets, redis)
