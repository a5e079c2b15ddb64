"""Each workspace's installation of the app, and the OAuth flow's states, in Redis: bolt's store interfaces.

Every adapter process behind a load balancer reads the same installations and states: a person
may start the install on one process and come back to another. Installations are kept encrypted
with Fernet (SLACK_INSTALLATION_KEY), so a copy of Redis holds no usable token.

The app asks for bot scopes only (no user tokens, bolt's `installation_store_bot_only`): a
workspace's installation is its bot, one record per workspace (or per organisation, for an
org-wide install on Enterprise Grid). Deleting the bot (a `tokens_revoked` event) deletes the
record, which carries the same token.

Keys (contract/keys.py's PREFIX):
  slack:installation:<enterprise or ->:<team or ->   the workspace's Installation, Fernet-encrypted JSON;
                           deleted when the app is uninstalled or its bot token revoked
  slack:oauth-state:<state>   an install begun: consumed once by Slack's redirect, or gone after the
                           state's lifetime (bolt's state_expiration_seconds, 10 minutes)
"""

from __future__ import annotations

import json
import logging
import secrets

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from redis.asyncio import Redis
from slack_sdk.oauth.installation_store import Bot, Installation
from slack_sdk.oauth.installation_store.async_installation_store import AsyncInstallationStore
from slack_sdk.oauth.state_store.async_state_store import AsyncOAuthStateStore

from contract import keys

log = logging.getLogger(__name__)


def installation_key(enterprise_id: str | None, team_id: str | None) -> str:
    return f"{keys.PREFIX}slack:installation:{enterprise_id or '-'}:{team_id or '-'}"


def oauth_state_key(state: str) -> str:
    return f"{keys.PREFIX}slack:oauth-state:{state}"


def installation_keys(text: str) -> list[Fernet]:
    """SLACK_INSTALLATION_KEY: one Fernet key, or several separated by commas while rotating (the first encrypts)."""
    fernets = [Fernet(key.strip()) for key in text.split(",") if key.strip()]
    if not fernets:
        raise ValueError("no key")
    return fernets


class RedisInstallationStore(AsyncInstallationStore):
    def __init__(self, redis: Redis, fernet_keys: list[Fernet]):
        self.redis = redis
        self.current = fernet_keys[0]
        self.any_key = MultiFernet(fernet_keys)

    @property
    def logger(self) -> logging.Logger:
        return log

    async def async_save(self, installation: Installation) -> None:
        team_id = None if installation.is_enterprise_install else installation.team_id
        # __dict__, as slack-sdk's own stores keep it: plain JSON values that Installation(**...) reads back.
        await self._write(installation_key(installation.enterprise_id, team_id), installation.__dict__)

    async def async_save_bot(self, bot: Bot) -> None:
        """A rotated bot token (apps with token rotation turned on): it replaces the installation's."""
        team_id = None if bot.is_enterprise_install else bot.team_id
        key = installation_key(bot.enterprise_id, team_id)
        await self._write(key, {**(await self._read(key) or {}), **bot.__dict__})

    async def async_find_bot(
        self, *, enterprise_id: str | None, team_id: str | None, is_enterprise_install: bool | None = False
    ) -> Bot | None:
        installation = await self.async_find_installation(
            enterprise_id=enterprise_id, team_id=team_id, is_enterprise_install=is_enterprise_install
        )
        return installation.to_bot() if installation is not None and installation.bot_token else None

    async def async_find_installation(
        self, *, enterprise_id: str | None, team_id: str | None, user_id: str | None = None,
        is_enterprise_install: bool | None = False,
    ) -> Installation | None:
        data = await self._read(installation_key(enterprise_id, None if is_enterprise_install else team_id))
        if data is None or (user_id is not None and data.get("user_id") != user_id):
            return None
        return Installation(**data)

    async def async_delete_bot(self, *, enterprise_id: str | None, team_id: str | None) -> None:
        await self.redis.delete(installation_key(enterprise_id, team_id))

    async def async_delete_installation(
        self, *, enterprise_id: str | None, team_id: str | None, user_id: str | None = None
    ) -> None:
        # Without user tokens, a user's revoked token (tokens_revoked's `oauth`) leaves nothing to delete.
        if user_id is None:
            await self.redis.delete(installation_key(enterprise_id, team_id))

    async def _write(self, key: str, data: dict) -> None:
        await self.redis.set(key, self.current.encrypt(json.dumps(data).encode()).decode())

    async def _read(self, key: str) -> dict | None:
        stored = await self.redis.get(key)
        if stored is None:
            return None
        try:
            return json.loads(self.current.decrypt(stored))
        except InvalidToken:
            pass
        try:
            plain = self.any_key.decrypt(stored)
        except InvalidToken:
            log.error("slack installation not readable with SLACK_INSTALLATION_KEY: add its old key, or reinstall", extra={"key": key})
            return None
        # Encrypted with an older key: written again with the current one (unless deleted meanwhile), so
        # the old key can go once every workspace has been read.
        await self.redis.set(key, self.current.encrypt(plain).decode(), xx=True)
        return json.loads(plain)


class RedisOAuthStateStore(AsyncOAuthStateStore):
    """The `state` of an install begun, checked when Slack redirects the person back: valid once, for a while."""

    def __init__(self, redis: Redis, expiration_seconds: int):
        self.redis = redis
        self.expiration_seconds = expiration_seconds

    @property
    def logger(self) -> logging.Logger:
        return log

    async def async_issue(self, *args, **kwargs) -> str:
        state = secrets.token_urlsafe(32)
        await self.redis.set(oauth_state_key(state), 1, ex=self.expiration_seconds)
        return state

    async def async_consume(self, state: str) -> bool:
        # DEL answers 1 to one caller only: a replayed redirect finds no state.
        return bool(state) and await self.redis.delete(oauth_state_key(state)) == 1
