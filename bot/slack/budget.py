"""Slack's rate limits as token buckets in Redis, shared by every adapter process.

Slack limits each Web API method per workspace (chat.postMessage per channel) and answers
429 with Retry-After past it. A bucket per (scope, method) holds up to a quarter of a
minute's calls and refills at the method's rate; a 429 empties it until Retry-After has
passed, so every process and conversation of that workspace waits, and no other workspace
does. The clock is Redis's, so processes on several machines agree.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from redis.asyncio import Redis
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse

from bot.delivery import Deferred, request_refused, request_sent
from bot.slack.tokens import BotTokens
from contract import keys
from service.observability import PLATFORM_ERRORS
from service.redis_client import REDIS_FAILED

log = logging.getLogger(__name__)
# A Web API call that did not go through: Slack's error, or the network's.
CALL_FAILED = (SlackClientError, aiohttp.ClientError, asyncio.TimeoutError)
# What a best-effort call (a status, a title, a name lookup) may meet; the caller logs it and goes on.
SLACK_FAILED = (*CALL_FAILED, Deferred)
BURST_MINUTES = 0.25  # a bucket holds this much of a minute's calls
# Slack's answers to a token that is no longer good: a cached one is looked up again next time.
TOKEN_GONE = {"invalid_auth", "token_revoked", "account_inactive"}

# Returns 0 when a call was taken, else the milliseconds until one will be there.
_TAKE = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local rate, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'paused_until')
local paused_until = tonumber(state[3] or 0)
if now < paused_until then return paused_until - now end
local tokens = tonumber(state[1] or capacity)
local at = tonumber(state[2] or now)
tokens = math.min(capacity, tokens + (now - at) * rate)
local taken = 0
if tokens >= 1 then tokens = tokens - 1 else taken = math.ceil((1 - tokens) / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate) + 60000)
return taken
"""

_PAUSE = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], 'tokens', '0', 'at', now, 'paused_until', now + tonumber(ARGV[1]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) + 60000)
"""


class SlackBudget:
    def __init__(self, redis: Redis, per_minute: dict[str, float]):
        self.redis = redis
        self.per_minute = per_minute
        self._take = redis.register_script(_TAKE)
        self._pause = redis.register_script(_PAUSE)

    async def take(self, scope: str, method: str, wait: bool) -> bool:
        """One call of `method` for `scope`; `wait` sleeps until there is one, else False when short."""
        rate = self.per_minute[method]
        capacity = max(1.0, rate * BURST_MINUTES)
        while True:
            try:
                wait_ms = int(await self._take(keys=[keys.slack_budget(scope, method)], args=[rate / 60_000, capacity]))
            except REDIS_FAILED as error:
                # The budget only paces calls: without Redis, Slack's own 429s still do.
                log.warning("rate budget unavailable", extra={"method": method, "error": str(error)})
                return True
            if wait_ms == 0:
                return True
            if not wait:
                return False
            await asyncio.sleep(wait_ms / 1000)

    async def pause(self, scope: str, method: str, retry_after_s: float) -> None:
        """Slack answered 429: no call of `method` for `scope` until Retry-After has passed."""
        log.warning("slack rate limited", extra={"scope": scope, "method": method, "retry_after_s": retry_after_s})
        PLATFORM_ERRORS.labels("slack", f"ratelimited:{method}").inc()
        try:
            await self._pause(keys=[keys.slack_budget(scope, method)], args=[int(retry_after_s * 1000)])
        except REDIS_FAILED as error:
            log.warning("rate budget unavailable", extra={"method": method, "error": str(error)})


def retry_after_s(error: SlackApiError) -> float:
    headers = {name.lower(): value for name, value in (error.response.headers or {}).items()}
    try:
        return float(headers.get("retry-after", 1))
    except ValueError:
        return 1.0


class PacedSlack:
    """Web API calls within the workspace's budget, with its bot token; a 429 pauses that workspace and method only."""

    def __init__(self, client: AsyncWebClient, budget: SlackBudget, tokens: BotTokens):
        self.client = client
        self.budget = budget
        self.tokens = tokens

    async def call(self, method: str, reply_to: dict[str, str], wait: bool, **arguments: Any) -> AsyncSlackResponse:
        """Call `method`; without `wait`, Deferred when the budget is short or Slack says 429."""
        scope = reply_to["channel"] if method == "chat.postMessage" else reply_to.get("team", "workspace")
        # Over any token the caller passed (slack-sdk's stream helper passes its own, None).
        arguments["token"] = await self.tokens.of(reply_to)
        while True:
            if not await self.budget.take(scope, method, wait):
                raise Deferred(method)
            request_sent()  # past the budget's wait: a post this call makes is to be recorded, not abandoned
            try:
                return await getattr(self.client, method.replace(".", "_"))(**arguments)
            except SlackApiError as error:
                if error.response.get("error") in TOKEN_GONE:
                    self.tokens.forget(reply_to)
                if error.response.status_code != 429:
                    raise
                request_refused()
                await self.budget.pause(scope, method, retry_after_s(error))
                if not wait:
                    raise Deferred(method) from error
