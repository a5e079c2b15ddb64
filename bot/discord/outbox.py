"""The Discord side of reply delivery: post and edit channel messages over REST."""

from __future__ import annotations

import discord
from redis.asyncio import Redis

from bot.delivery import Part
from bot.discord.routing import job_id_of
from bot.discord.typing_indicator import TypingIndicators
from contract import keys

LIMIT = 2000  # characters in one Discord message
# Replies ping their author; text the model writes never pings anyone.
REPLY_MENTIONS = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=True)


class DiscordOutbox:
    limit = LIMIT
    settles = False  # an edit with the same text would only spend the channel's rate limit

    def __init__(self, client: discord.Client, redis: Redis, typing: TypingIndicators):
        self.client = client
        self.redis = redis
        self.typing = typing

    async def post(self, part: Part) -> str:
        reply_to = part.reply_to
        self.typing.stop(reply_to["message"])
        channel = self.client.get_partial_messageable(int(reply_to["channel"]))
        reference = None
        if not await self._started(reply_to["message"]):
            reference = discord.MessageReference(
                message_id=int(reply_to["message"]), channel_id=channel.id, fail_if_not_exists=False
            )
        message = await channel.send(part.text, reference=reference, allowed_mentions=REPLY_MENTIONS)
        return str(message.id)

    async def edit(self, message_id: str, part: Part) -> None:
        channel = self.client.get_partial_messageable(int(part.reply_to["channel"]))
        await channel.get_partial_message(int(message_id)).edit(content=part.text)

    async def remove(self, message_id: str, reply_to: dict[str, str]) -> None:
        channel = self.client.get_partial_messageable(int(reply_to["channel"]))
        await channel.get_partial_message(int(message_id)).delete()

    async def _started(self, user_message_id: str) -> bool:
        # Delivery records each posted message before posting the next, so a recorded one
        # means this post continues the answer: only the first message is a reply. Reading
        # it from Redis keeps that true across adapter restarts.
        return bool(await self.redis.exists(keys.posted(job_id_of(user_message_id))))
