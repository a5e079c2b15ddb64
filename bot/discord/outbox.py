"""The Discord side of reply delivery: post and edit channel messages over REST, with the answer's
buttons (Stop while it streams, Regenerate once finished: bot/discord/controls.py)."""

from __future__ import annotations

import aiohttp
import discord

from bot.delivery import Part, request_refused, request_sent
from bot.discord.controls import controls_for

LIMIT = 2000  # characters in one Discord message
# Replies ping their author; text the model writes never pings anyone.
REPLY_MENTIONS = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=True)


def request_tracing() -> aiohttp.TraceConfig:
    """For the client's `http_trace`: tells delivery when a REST request goes out, which is after discord.py's
    own waits for the rate limits, and when one is answered 429 (discord.py then waits and sends it again)."""

    async def started(session, context, params) -> None:
        request_sent()

    async def ended(session, context, params) -> None:
        if params.response.status == 429:
            request_refused()

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(started)
    trace.on_request_end.append(ended)
    return trace


class DiscordOutbox:
    limit = LIMIT
    # A message whose text stops changing is edited once more: its Stop button goes, or turns into Regenerate.
    settles = True

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
        message = await channel.send(part.text, reference=reference, allowed_mentions=REPLY_MENTIONS, view=controls_for(part))
        return str(message.id)

    async def edit(self, message_id: str, part: Part) -> None:
        channel = self.client.get_partial_messageable(int(part.reply_to["channel"]))
        # No buttons (None) removes those the message had.
        await channel.get_partial_message(int(message_id)).edit(content=part.text, view=controls_for(part))

    async def remove(self, message_id: str, reply_to: dict[str, str]) -> None:
        channel = self.client.get_partial_messageable(int(reply_to["channel"]))
        await channel.get_partial_message(int(message_id)).delete()

    def refused(self, error: Exception) -> bool:
        # discord.py already tries 5xx and dropped connections again itself, and waits out 429s.
        return isinstance(error, discord.HTTPException) and 400 <= error.status < 500 and error.status != 429
