"""Pausing the service: workers take no new message, running answers finish, people are told.

One key, `paused`, holding the operator's reason (or nothing). Every process reads it through
Redis: submitting refuses a message with one sentence while it is set (contract/intake.py), and
claiming leases nothing (contract/work.py); messages queued before the pause wait for the resume.
"""

from __future__ import annotations

from redis.asyncio import Redis

from contract import keys

PAUSED = "The bot is paused by its operators right now, so this message was not taken. Please try again later."


def paused_sentence(reason: str) -> str:
    return f"{PAUSED} ({reason})" if reason else PAUSED


async def pause(redis: Redis, reason: str = "") -> None:
    await redis.set(keys.PAUSED, reason.strip())


async def resume(redis: Redis) -> bool:
    """False when the service was not paused."""
    return bool(await redis.delete(keys.PAUSED))


async def paused(redis: Redis) -> str | None:
    """The pause's reason ("" when none was given), or None while the service runs."""
    return await redis.get(keys.PAUSED)
