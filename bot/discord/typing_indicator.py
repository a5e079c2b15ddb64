""""Bot is typing..." in a channel while any of its messages waits for the start of its reply."""

from __future__ import annotations

import asyncio
import logging

import discord
from redis.asyncio import Redis

from bot.discord.routing import job_id_of, message_id_of
from contract import keys
from service.redis_client import REDIS_FAILED

log = logging.getLogger(__name__)

# A reply that never comes (no worker running) must not leave the bot typing forever.
MAX_TYPING_S = 300.0
# How often a channel's waiting messages are looked up in Redis for an answer begun by another process.
CHECK_S = 1.0


class TypingIndicators:
    """One indicator per channel, however many of its messages wait: a busy channel would
    otherwise fire one typing call per message into Discord's rate limits.

    The answer may be posted by another adapter process (the holder of its reply shard,
    bot/delivery.py), which stops only its own indicators: so each indicator also asks Redis,
    every CHECK_S, which of its messages have an answer posted (or finished) and stops for those."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._waiting: dict[int, set[str]] = {}  # channel id -> message ids waiting for a reply
        self._channel_of: dict[str, int] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def start(self, channel: discord.abc.Messageable, message_id: str) -> bool:
        """Returns False if that message was already waiting."""
        if message_id in self._channel_of:
            return False
        self._channel_of[message_id] = channel.id
        self._waiting.setdefault(channel.id, set()).add(message_id)
        if channel.id not in self._tasks:
            task = asyncio.create_task(self._type(channel))
            self._tasks[channel.id] = task
            task.add_done_callback(lambda done: self._forget(channel.id, done))
        return True

    def stop(self, message_id: str) -> None:
        channel_id = self._channel_of.pop(message_id, None)
        if channel_id is None:
            return
        waiting = self._waiting.get(channel_id, set())
        waiting.discard(message_id)
        if not waiting:
            self._waiting.pop(channel_id, None)
            task = self._tasks.pop(channel_id, None)
            if task:
                task.cancel()

    async def answered(self, job_id: str) -> None:
        """Delivery's `Waiting` call: the answer to the job's message began (bot/delivery.py)."""
        self.stop(message_id_of(job_id))

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._waiting.clear()
        self._channel_of.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _forget(self, channel_id: int, task: asyncio.Task[None]) -> None:
        if self._tasks.get(channel_id) is task:  # it ended by itself (time limit, or a failed call)
            del self._tasks[channel_id]
            for message_id in self._waiting.pop(channel_id, set()):
                self._channel_of.pop(message_id, None)

    async def _type(self, channel: discord.abc.Messageable) -> None:
        # discord.py's Typing re-sends the indicator every 5 s while the block runs.
        try:
            async with channel.typing():
                for _ in range(round(MAX_TYPING_S / CHECK_S)):
                    await asyncio.sleep(CHECK_S)
                    await self._stop_answered(channel.id)  # stopping the last one cancels this task
        except discord.HTTPException as error:
            log.warning("typing indicator failed", extra={"channel": channel.id, "error": str(error)})

    async def _stop_answered(self, channel_id: int) -> None:
        waiting = sorted(self._waiting.get(channel_id, ()))
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for message_id in waiting:
                    job_id = job_id_of(message_id)
                    pipe.exists(keys.posted(job_id), keys.done(job_id))
                found = await pipe.execute()
        except REDIS_FAILED as error:  # this process's own deliveries and the time limit still stop it
            log.warning("typing indicator could not look up answers", extra={"channel": channel_id, "error": str(error)})
            return
        for message_id, answered in zip(waiting, found):
            if answered:
                self.stop(message_id)
