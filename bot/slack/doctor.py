"""`chatbot doctor`'s Slack checks: the tokens, the scopes granted against slack_manifest.yaml, Socket Mode,
and (with an app configuration token) the app's events and slash commands."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import aiohttp
import yaml
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.app import slack_tokens, web_client
from bot.slack.installations import RedisInstallationStore, installation_key, installation_keys
from bot.slack.workspaces import oauth_secrets
from service.config import ConfigError, Secrets, Settings
from service.doctor import APP_CONFIG_TOKEN, Check, fail, ok, skipped
from service.redis_client import connect

# The manifest the app is created from: beside the code in a checkout, or in the working directory.
MANIFEST_PLACES = (Path(__file__).resolve().parents[2] / "slack_manifest.yaml", Path("slack_manifest.yaml"))
# Slack answers every Web API call made with a bot token with the scopes that token was granted.
SCOPES_HEADER = "x-oauth-scopes"
UNREACHABLE = (aiohttp.ClientError, OSError)


def load_manifest() -> dict | None:
    for place in MANIFEST_PLACES:
        if place.is_file():
            return yaml.safe_load(place.read_text())
    return None


def _error(error: SlackApiError | aiohttp.ClientError | OSError) -> str:
    return error.response["error"] if isinstance(error, SlackApiError) else f"unreachable: {error}"


async def slack_checks(settings: Settings, secrets: Secrets) -> list[Check]:
    url = settings.slack.api_url
    try:
        slack_tokens(settings, secrets)
        checks = [ok("slack tokens", f"the tokens slack.mode {settings.slack.mode} needs are set")]
    except ConfigError as error:
        checks = [fail("slack tokens", f"{error} (slack.mode {settings.slack.mode})", "export them before `chatbot slack`")]

    client = web_client(secrets.get("SLACK_BOT_TOKEN"), url)
    try:
        identity = await client.auth_test()
    except (SlackApiError, *UNREACHABLE) as error:
        return [
            *checks,
            fail(
                "slack bot token", f"auth.test refused it ({_error(error)})",
                "copy the Bot User OAuth Token (xoxb-...) again from the app's OAuth & Permissions page into SLACK_BOT_TOKEN",
            ),
        ]
    checks.append(ok("slack bot token", f"valid: bot user {identity['user']} in workspace {identity['team']} ({identity['team_id']})"))

    manifest = load_manifest()
    checks.append(_scopes(identity.headers.get(SCOPES_HEADER), manifest))
    if secrets.get("SLACK_APP_TOKEN"):
        checks.append(await _socket_mode(secrets.get("SLACK_APP_TOKEN"), url))
    if not secrets.get(APP_CONFIG_TOKEN):
        checks.append(skipped("slack events", f"set {APP_CONFIG_TOKEN} to compare the app's events and commands with the manifest"))
    elif manifest is None:
        checks.append(skipped("slack events", "slack_manifest.yaml not found here: nothing to compare the app's events with"))
    else:
        checks += await _app_configuration(client, identity["bot_id"], secrets.get(APP_CONFIG_TOKEN), url, manifest, settings)
    return checks


async def workspace_checks(settings: Settings, secrets: Secrets, redis_at: str | None) -> list[Check]:
    """Many-workspace mode: the app's OAuth credentials, then each installation's bot token and its scopes."""
    try:
        oauth = oauth_secrets(secrets)
    except ConfigError as error:
        return [fail("slack app", str(error), "set SLACK_CLIENT_ID, SLACK_CLIENT_SECRET and SLACK_INSTALLATION_KEY together")]
    checks = [ok("slack app", "many workspaces: the OAuth credentials and the installation key are set")]
    if redis_at is None:
        return [*checks, skipped("slack workspaces", "no Redis to read the installations from")]
    redis = connect(redis_at)
    try:
        store = RedisInstallationStore(redis, installation_keys(oauth.installation_key))
        installed = []
        async for key in redis.scan_iter(match=installation_key("*", "*")):
            enterprise, team = (None if part == "-" else part for part in key.rsplit(":", 2)[1:])
            installed.append((team, await store.async_find_installation(enterprise_id=enterprise, team_id=team)))
    finally:
        await redis.aclose()
    if not installed:
        return [*checks, ok("slack workspaces", "no workspace has installed the app yet: share <adapter>/slack/install")]
    manifest = load_manifest()
    for team, installation in installed:
        name = f"slack workspace {team or 'enterprise-wide'}"
        if installation is None or not installation.bot_token:
            checks.append(fail(name, "its installation cannot be read", "add the key it was written with to SLACK_INSTALLATION_KEY, or reinstall"))
            continue
        try:
            identity = await web_client(installation.bot_token, settings.slack.api_url).auth_test()
        except (SlackApiError, *UNREACHABLE) as error:
            checks.append(fail(name, f"auth.test refused its bot token ({_error(error)})", "reinstall the app in that workspace"))
            continue
        scopes = _scopes(identity.headers.get(SCOPES_HEADER), manifest)
        checks.append(replace(scopes, name=name) if scopes.status != "ok" else ok(name, f"installed, {scopes.detail}"))
    return checks


def _scopes(granted_header: str | None, manifest: dict | None) -> Check:
    if manifest is None:
        return skipped("slack scopes", "slack_manifest.yaml not found here: nothing to compare the granted scopes with")
    if granted_header is None:
        return skipped("slack scopes", f"Slack's answer carried no {SCOPES_HEADER} header")
    wanted = manifest["oauth_config"]["scopes"]["bot"]
    granted = {scope.strip() for scope in granted_header.split(",")}
    missing = [scope for scope in wanted if scope not in granted]
    if missing:
        return fail(
            "slack scopes", f"the bot token lacks {', '.join(missing)}",
            f"add them under OAuth & Permissions -> Bot Token Scopes (or update the app from slack_manifest.yaml), "
            f"then reinstall the app after adding: {', '.join(missing)}",
        )
    return ok("slack scopes", f"the bot token has the manifest's {len(wanted)} scopes")


async def _socket_mode(app_token: str, url: str) -> Check:
    try:
        await web_client(app_token, url).apps_connections_open(app_token=app_token)
    except (SlackApiError, *UNREACHABLE) as error:
        return fail(
            "slack socket mode", f"apps.connections.open refused SLACK_APP_TOKEN ({_error(error)})",
            "create an app-level token with the connections:write scope (Basic Information -> App-Level Tokens) "
            "into SLACK_APP_TOKEN, and turn Socket Mode on",
        )
    return ok("slack socket mode", "apps.connections.open accepts SLACK_APP_TOKEN")


async def _app_configuration(
    client: AsyncWebClient, bot_id: str, config_token: str, url: str, manifest: dict, settings: Settings
) -> list[Check]:
    """The app's event subscriptions against the manifest's, its slash commands against the ones configured."""
    try:
        app_id = (await client.bots_info(bot=bot_id))["bot"]["app_id"]
        exported = (await web_client(config_token, url).apps_manifest_export(app_id=app_id))["manifest"]
    except (SlackApiError, *UNREACHABLE) as error:
        return [
            fail(
                "slack events", f"could not export the app's manifest ({_error(error)})",
                f"generate a new app configuration token (they last 12 hours) at api.slack.com/apps into {APP_CONFIG_TOKEN}",
            )
        ]
    subscribed = set(exported.get("settings", {}).get("event_subscriptions", {}).get("bot_events", []))
    missing_events = [event for event in manifest["settings"]["event_subscriptions"]["bot_events"] if event not in subscribed]
    commands = {command["command"] for command in exported.get("features", {}).get("slash_commands", [])}
    # The commands this configuration answers, which an operator may have renamed from the manifest's.
    missing_commands = [c for c in (settings.slack.reset_command, settings.slack.persona_command) if c not in commands]
    return [
        fail(
            "slack events", f"the app is not subscribed to {', '.join(missing_events)}",
            "add them under Event Subscriptions -> Subscribe to bot events (or update the app from slack_manifest.yaml)",
        )
        if missing_events
        else ok("slack events", f"the app is subscribed to the manifest's {len(subscribed)} bot events"),
        fail(
            "slack commands", f"the app has no {', '.join(missing_commands)}",
            "create them under Slash Commands (slack.reset_command, slack.persona_command name them)",
        )
        if missing_commands
        else ok("slack commands", f"the app has {settings.slack.reset_command} and {settings.slack.persona_command}"),
    ]
