""""Bot is typing..." in a channel from a message's arrival until its reply starts."""

from __future__ import annotations

import asyncio
import logging

import discord

log = logging.getLogger(__name__)

# A reply that never comes (no worker running) must not leave the bot typing forever.
MAX_TYPING_S = 300.0


class TypingIndicators:
    """One indicator per waiting message, keyed by the message's id."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, channel: discord.abc.Messageable, message_id: str) -> bool:
        """Returns False if that message already has its indicator."""
        if message_id in self._tasks:
            return False
        task = asyncio.create_task(self._type(channel, message_id))
        self._tasks[message_id] = task
        task.add_done_callback(lambda done: self._forget(message_id, done))
        return True

    def stop(self, message_id: str) -> None:
        task = self._tasks.pop(message_id, None)
        if task:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _forget(self, message_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(message_id) is task:
            del self._tasks[message_id]

    @staticmethod
    async def _type(channel: discord.abc.Messageable, message_id: str) -> None:
        # discord.py's Typing re-sends the indicator every 5 s while the block runs.
        try:
            async with channel.typing():
                await asyncio.sleep(MAX_TYPING_S)
        except discord.HTTPException as error:
            log.warning("typing indicator failed", extra={"discord_message": message_id, "error": str(error)})
