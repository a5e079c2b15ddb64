"""Which bot token a Web API call uses: the one SLACK_BOT_TOKEN, or the installed token of the reply's workspace.

Replies are delivered outside any Slack request (bot/delivery.py), so bolt's per-request client
does not help there: every call names its workspace in `reply_to` ("team", and "enterprise" on
Enterprise Grid), and the token is looked up for it.
"""

from __future__ import annotations

import time
from typing import Protocol

from slack_sdk.errors import SlackClientError
from slack_sdk.oauth.installation_store.async_installation_store import AsyncInstallationStore

# A token is read from Redis again after this long: an uninstall or a reinstall seen by another
# process reaches this one within it (this process forgets at once what it saw itself).
CACHE_S = 30.0


class NotInstalled(SlackClientError):
    """The workspace has no installation: uninstalled, its token revoked, or never installed."""


class BotTokens(Protocol):
    async def of(self, where: dict[str, str]) -> str: ...

    def forget(self, where: dict[str, str]) -> None: ...


class SingleToken:
    """One workspace: SLACK_BOT_TOKEN for every call."""

    def __init__(self, token: str):
        self.token = token

    async def of(self, where: dict[str, str]) -> str:
        return self.token

    def forget(self, where: dict[str, str]) -> None:
        """Nothing is cached: the one token is the operator's to replace."""


class InstalledTokens:
    """Many workspaces: each one's bot token from the installation store, cached for CACHE_S."""

    def __init__(self, store: AsyncInstallationStore, cache_s: float = CACHE_S):
        self.store = store
        self.cache_s = cache_s
        self.cached: dict[tuple[str | None, str | None], tuple[str, float]] = {}  # -> (token, time.monotonic() it lapses)

    async def of(self, where: dict[str, str]) -> str:
        workspace = (where.get("enterprise"), where.get("team"))
        token, lapses = self.cached.get(workspace, ("", 0.0))
        if time.monotonic() < lapses:
            return token
        enterprise, team = workspace
        bot = await self.store.async_find_bot(enterprise_id=enterprise, team_id=team)
        if bot is None and enterprise:  # an org-wide install serves every workspace of the organisation
            bot = await self.store.async_find_bot(enterprise_id=enterprise, team_id=None, is_enterprise_install=True)
        if bot is None:
            raise NotInstalled(f"the app is not installed in workspace {team or '(none named)'}")
        self.cached[workspace] = (bot.bot_token, time.monotonic() + self.cache_s)
        return bot.bot_token

    def forget(self, where: dict[str, str]) -> None:
        self.cached.pop((where.get("enterprise"), where.get("team")), None)
