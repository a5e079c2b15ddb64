"""What the bot does with the requests bolt hands it: queue messages, reset conversations."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext
from slack_sdk.errors import SlackClientError
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.messages import PLATFORM, Incoming, direct_message, mention
from bot.slack.outbox import SlackOutbox
from engine import history
from engine.config import SlackSettings
from engine.jobs import Conversation, RejectedMessage
from engine.queue import JobQueue
from engine.redis_client import REDIS_DOWN

log = logging.getLogger(__name__)

RESET_DONE = "Done: I have forgotten our conversation."
RESET_IN_CHANNEL = "In channels every thread is its own conversation: mention me in a new thread to start afresh."
RESET_FAILED = "Sorry, the conversation could not be reset right now. Please try again later."
# Slack shows an error unless a slash command is acknowledged within 3 s, and the
# acknowledgement carries the answer: the reset gets what is left after network time.
RESET_TIMEOUT_S = 2.0


class DisplayNames:
    """Authors' names for prompts in shared channels, looked up once per user per process."""

    def __init__(self, client: AsyncWebClient):
        self.client = client
        self.known: dict[str, str] = {}

    async def of(self, user_id: str | None) -> str | None:
        if not user_id:
            return None
        if user_id not in self.known:
            try:
                response = await self.client.users_info(user=user_id)
            except (SlackClientError, aiohttp.ClientError, asyncio.TimeoutError) as error:
                log.warning("user name lookup failed", extra={"user": user_id, "error": str(error)})
                return None
            user = response["user"]
            profile = user.get("profile", {})
            self.known[user_id] = profile.get("display_name") or profile.get("real_name") or user.get("name") or user_id
        return self.known[user_id]


def register(app: AsyncApp, settings: SlackSettings, queue: JobQueue, outbox: SlackOutbox) -> None:
    redis = queue.redis
    names = DisplayNames(app.client)

    async def submit(incoming: Incoming, author: str | None) -> None:
        try:
            submitted = await queue.submit(
                incoming.conversation, incoming.message_id, incoming.text, author, incoming.reply_to, author_id=incoming.user
            )
        except RejectedMessage as rejected:
            log.info("message refused", extra={"slack_message": incoming.message_id, "reason": str(rejected)})
            await outbox.post(incoming.reply_to, str(rejected))
            return
        log.info(
            "retried delivery ignored" if submitted.duplicate else "message queued",
            extra={"job": submitted.job_id, "conversation": incoming.conversation.key, "ahead": submitted.ahead},
        )

    @app.event("message")
    async def on_message(event: dict) -> None:
        incoming = direct_message(event)
        if incoming is None:
            log.debug("message event ignored", extra={"subtype": event.get("subtype"), "channel_type": event.get("channel_type")})
            return
        await submit(incoming, author=None)

    @app.event("app_mention")
    async def on_mention(event: dict, context: AsyncBoltContext) -> None:
        # Registered even when mentions are off: an unhandled event would get a 404 and be retried.
        incoming = mention(event, context.bot_user_id) if settings.answer_mentions else None
        if incoming is None:
            return
        await submit(incoming, await names.of(incoming.user))

    @app.command(settings.reset_command)
    async def on_reset(ack: AsyncAck, command: dict) -> None:
        who = {"user": command.get("user_id"), "channel": command.get("channel_id")}
        if command.get("channel_name") != "directmessage":
            await ack(response_type="ephemeral", text=RESET_IN_CHANNEL)
            return
        conversation = Conversation(platform=PLATFORM, channel=command["channel_id"])
        try:
            epoch = await asyncio.wait_for(history.reset(redis, conversation.key), RESET_TIMEOUT_S)
        except (asyncio.TimeoutError, *REDIS_DOWN) as error:
            log.error("reset failed", extra={**who, "error": str(error) or type(error).__name__})
            await ack(response_type="ephemeral", text=RESET_FAILED)
            return
        log.info("conversation reset", extra={**who, "conversation": conversation.key, "epoch": epoch})
        await ack(response_type="ephemeral", text=RESET_DONE)
