"""The Discord side of reply delivery: post and edit channel messages over REST."""

from __future__ import annotations

import discord

from bot.delivery import Part

LIMIT = 2000  # characters in one Discord message
# Replies ping their author; text the model writes never pings anyone.
REPLY_MENTIONS = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=True)


class DiscordOutbox:
    limit = LIMIT
    settles = False  # an edit with the same text would only spend the channel's rate limit

    def __init__(self, client: discord.Client):
        self.client = client

    async def post(self, part: Part) -> str:
        reply_to = part.reply_to
        channel = self.client.get_partial_messageable(int(reply_to["channel"]))
        reference = None
        if part.index == 0:  # the first message answers the user's; follow-ups continue it
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
