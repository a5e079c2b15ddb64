"""The checks of `chatbot doctor`: one line each, `ok`, `FAIL` (with what to fix) or `skipped` (with why).

Here: the result type and the Redis checks. The model checks itself (engine/doctor.py), each
platform itself (bot/slack/doctor.py, bot/discord/doctor.py); chatbot/doctor.py runs them all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

APP_CONFIG_TOKEN = "SLACK_APP_CONFIG_TOKEN"  # read by bot/slack/doctor.py only
# A server or platform that has not answered by then is reported, and the other checks still run.
GROUP_TIMEOUT_S = 60.0
REDIS_TIMEOUT_S = 5.0

Status = Literal["ok", "FAIL", "skipped"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str  # what was found
    fix: str = ""  # for a FAIL: what to change, and where

    def line(self) -> str:
        return f"{self.status:<8} {self.name}: {self.detail}" + (f". Fix: {self.fix}" if self.fix else "")


def ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, "FAIL", detail, fix)


def skipped(name: str, detail: str) -> Check:
    return Check(name, "skipped", detail)


async def within(what: str, checks: Awaitable[list[Check]]) -> list[Check]:
    """A group of checks that has not answered within GROUP_TIMEOUT_S is one failed check."""
    try:
        return await asyncio.wait_for(checks, GROUP_TIMEOUT_S)
    except TimeoutError:
        # Our limit, or a client's own shorter one.
        return [fail(what, "no answer in time", f"check that this machine can reach {what}")]


# --- Redis ----------------------------------------------------------------------------------


def _where(url: str) -> str:
    """The server's address without the credentials a URL may carry."""
    parts = urlsplit(url)
    return parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"


async def redis_checks(url: str) -> list[Check]:
    client = Redis.from_url(url, decode_responses=True, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S)
    try:
        try:
            await client.ping()
        except RedisError as error:
            return [fail("redis", f"cannot reach {_where(url)} ({error})", "start it, or set REDIS_URL to the server the worker uses")]
        reachable = ok("redis", f"reachable at {_where(url)}")
        try:
            policy = (await client.config_get("maxmemory-policy"))["maxmemory-policy"]
            appendonly = (await client.config_get("appendonly"))["appendonly"]
            save = (await client.config_get("save"))["save"]
        except ResponseError as error:  # CONFIG renamed away, refused by an ACL, or a managed service's
            return [
                reachable,
                skipped("redis memory", f"could not be checked: CONFIG GET refused ({error}); make sure maxmemory-policy is noeviction"),
                skipped("redis persistence", f"could not be checked: CONFIG GET refused ({error}); make sure appendonly is yes"),
            ]
        return [reachable, _memory(policy), _persistence(appendonly, save)]
    finally:
        await client.aclose()


def _memory(policy: str) -> Check:
    if policy == "noeviction":
        return ok("redis memory", "maxmemory-policy is noeviction (a full Redis refuses writes, people are asked to try again)")
    return fail(
        "redis memory",
        f"maxmemory-policy is {policy}: a full Redis may silently evict queued jobs and histories",
        "CONFIG SET maxmemory-policy noeviction, and in redis.conf: maxmemory-policy noeviction",
    )


def _persistence(appendonly: str, save: str) -> Check:
    if appendonly == "yes":
        return ok("redis persistence", "appendonly yes")
    if save.strip():
        return ok("redis persistence", f"snapshots only (save {save}): a crash loses what was written since the last one")
    return fail(
        "redis persistence",
        'off (appendonly no, save ""): a Redis restart loses queued messages, leases and histories',
        "CONFIG SET appendonly yes, then CONFIG REWRITE (or in redis.conf: appendonly yes, appendfsync everysec)",
    )
