"""Many workspaces: the app installed through Slack's OAuth flow, each workspace's token kept in Redis.

With SLACK_CLIENT_ID, SLACK_CLIENT_SECRET and SLACK_INSTALLATION_KEY set, bolt serves the
install (`/slack/install`, which sends the person to Slack's consent page) and Slack's redirect
back (`/slack/oauth_redirect`), stores each workspace's installation (bot/slack/installations.py)
and authorizes every request with its workspace's token. Without them, SLACK_BOT_TOKEN serves
one workspace, as before. Uninstalls and revoked tokens are handled by bolt's own listeners;
this process also forgets the workspace at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from redis.asyncio import Redis
from slack_bolt.async_app import AsyncApp, AsyncBoltContext
from slack_bolt.oauth.async_oauth_settings import AsyncOAuthSettings

from bot.slack.installations import RedisInstallationStore, RedisOAuthStateStore, installation_keys
from bot.slack.messages import workspace
from bot.slack.tokens import InstalledTokens
from contract import keys
from service.config import ConfigError, Secrets

log = logging.getLogger(__name__)

# Read from the environment through service.config's Secrets (which must list them in SECRET_NAMES).
OAUTH_SECRET_NAMES = ("SLACK_CLIENT_ID", "SLACK_CLIENT_SECRET", "SLACK_INSTALLATION_KEY")
# What the install asks each workspace for: slack_manifest.yaml's bot scopes (a test checks), no user scopes.
BOT_SCOPES = (
    "app_mentions:read", "assistant:write", "chat:write", "commands", "files:read", "im:history", "im:read", "im:write",
    "users:read",
)
STATE_EXPIRATION_S = 600  # an install begun must come back from Slack within this


@dataclass(frozen=True)
class OAuthSecrets:
    client_id: str
    client_secret: str = field(repr=False)
    installation_key: str = field(repr=False)  # one Fernet key, or several (comma-separated, newest first) while rotating


def oauth_secrets(secrets: Secrets) -> OAuthSecrets | None:
    """The app's OAuth credentials; None: one workspace (SLACK_BOT_TOKEN). One of them set needs all three."""
    if not any(secrets.get(name) for name in OAUTH_SECRET_NAMES):
        return None
    values = secrets.require(*OAUTH_SECRET_NAMES)
    try:
        installation_keys(values["SLACK_INSTALLATION_KEY"])
    except ValueError:  # the key's text is not shown: it is a secret
        raise ConfigError(
            "SLACK_INSTALLATION_KEY is not a Fernet key (make one with: python -c "
            "'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
        ) from None
    return OAuthSecrets(values["SLACK_CLIENT_ID"], values["SLACK_CLIENT_SECRET"], values["SLACK_INSTALLATION_KEY"])


def oauth_settings(oauth: OAuthSecrets, redis: Redis) -> AsyncOAuthSettings:
    return AsyncOAuthSettings(
        client_id=oauth.client_id,
        client_secret=oauth.client_secret,
        scopes=list(BOT_SCOPES),
        user_scopes=[],
        install_page_rendering_enabled=False,  # /slack/install redirects straight to Slack's consent page
        installation_store=RedisInstallationStore(redis, installation_keys(oauth.installation_key)),
        installation_store_bot_only=True,
        # In Redis, not bolt's default files: the redirect may reach another adapter process than the install did.
        state_store=RedisOAuthStateStore(redis, STATE_EXPIRATION_S),
        state_expiration_seconds=STATE_EXPIRATION_S,
    )


def forget_uninstalled(app: AsyncApp, tokens: InstalledTokens, redis: Redis) -> None:
    """bolt's listeners delete the installation (`app_uninstalled`: all of it; `tokens_revoked`: the bot);
    then this process drops the cached token, and the workspace's suggested-prompts flags go."""
    uninstalled, revoked = app.default_app_uninstalled_event_listener(), app.default_tokens_revoked_event_listener()

    async def on_uninstalled(context: AsyncBoltContext) -> None:
        await uninstalled(context=context)
        await forget(context, "slack app uninstalled")

    async def on_tokens_revoked(event: dict, context: AsyncBoltContext) -> None:
        await revoked(event=event, context=context)
        await forget(context, "slack tokens revoked")

    async def forget(context: AsyncBoltContext, what: str) -> None:
        tokens.forget(workspace(context.team_id, context.enterprise_id))
        flags = [key async for key in redis.scan_iter(match=keys.slack_prompts_set(context.team_id, "*"), count=500)]
        if flags:
            await redis.delete(*flags)
        log.info(what, extra={"team": context.team_id, "enterprise": context.enterprise_id})

    app.event("app_uninstalled")(on_uninstalled)
    app.event("tokens_revoked")(on_tokens_revoked)
