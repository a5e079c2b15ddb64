"""The gateway side: turn Discord messages the bot should answer into jobs."""

from __future__ import annotations

import logging

import discord
from redis.exceptions import RedisError

from bot.discord.attachments import NOT_READABLE, SEPARATOR, attachment_text
from bot.discord.controls import RegenerateButton, StopButton
from bot.discord.outbox import request_tracing
from bot.discord.routing import conversation_of, reply_route, scope_of
from bot.discord.rules import Seen, message_text, opens_thread, refusal, text_refusal
from bot.discord.sharding import IdentifyLock
from bot.discord.typing_indicator import TypingIndicators
from bot.titles import thread_title
from contract.intake import Intake
from contract.jobs import UNAVAILABLE, RejectedMessage, Submitted
from service.discord_settings import DiscordSettings
from service.redis_client import REDIS_DOWN

log = logging.getLogger(__name__)

ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)
QUEUE_NOTICE = "Your message is number {position} in the queue; I will answer as soon as I can."


def intents(message_content: bool) -> discord.Intents:
    # Message Content is privileged; member lists are not needed (messages carry the author's roles).
    wanted = discord.Intents.none()
    wanted.guilds = wanted.guild_messages = wanted.dm_messages = True
    wanted.message_content = message_content
    return wanted


def seen(message: discord.Message, me: discord.ClientUser) -> Seen:
    channel = message.channel
    if isinstance(channel, discord.DMChannel):
        guild_id = None
    else:
        # An uncached guild gives a PartialMessageable that still knows its guild.
        guild_id = message.guild.id if message.guild else getattr(channel, "guild_id", None)
    return Seen(
        guild_id=guild_id,
        channel_id=channel.id,
        parent_id=channel.parent_id if isinstance(channel, discord.Thread) else None,
        role_ids=frozenset(role.id for role in getattr(message.author, "roles", ())),
        from_bot=message.author.bot,
        system=message.type not in ANSWERED_TYPES,
        mentions_me=any(user.id == me.id for user in message.mentions),
    )


class ChatClient(discord.AutoShardedClient):
    """The bot's gateway shards of this process (settings.shard_ids, or all of them), each handling the
    messages, commands and clicks of its own servers, the DMs on shard 0. Replies go out over REST,
    from whichever process holds their reply shard (bot/delivery.py)."""

    def __init__(self, settings: DiscordSettings, queue: Intake, typing: TypingIndicators):
        super().__init__(
            intents=intents(settings.message_content), max_messages=None, allowed_mentions=discord.AllowedMentions.none(),
            shard_count=settings.shard_count, shard_ids=settings.shard_ids, http_trace=request_tracing(),
        )
        self.settings = settings
        self.queue = queue
        self.typing = typing
        self.identify_lock = IdentifyLock(queue.redis, settings.identify_spacing_s)
        self.max_concurrency = 1  # sessions Discord starts at once (its rate-limit buckets): asked at login

    async def setup_hook(self) -> None:
        # The answers' buttons, dispatched on their custom_id: those posted before this process started work too.
        self.add_dynamic_items(StopButton, RegenerateButton)
        limits = await self.fetch_session_start_limits()
        self.max_concurrency = limits.max_concurrency
        log.info(
            "discord gateway",
            extra={
                "shard_count": self.shard_count or "recommended", "shard_ids": self.shard_ids or "all",
                "max_concurrency": limits.max_concurrency, "sessions_left": limits.remaining,
            },
        )

    @property
    def publishes_commands(self) -> bool:
        """One process publishes the application commands: the one running shard 0."""
        return self.shard_ids is None or 0 in self.shard_ids

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        # In place of discord.py's 5 s sleep between this process's shards: a wait shared with every process.
        await self.identify_lock.take(shard_id or 0, self.max_concurrency)

    async def on_message(self, message: discord.Message) -> None:
        facts = seen(message, self.user)
        reason = refusal(self.settings, facts)
        if reason:
            log.debug("message ignored", extra={"discord_message": message.id, "channel": facts.channel_id, "reason": reason})
            return
        names = {user.id: user.display_name for user in message.mentions}
        text = message_text(message.content, self.user.id, names)
        limit = self.queue.limits.max_message_chars
        has_attachments = bool(message.attachments or message.stickers)
        refused = text_refusal(text, has_attachments, limit)
        if refused:
            await self.tell(message, refused)
            return
        attached = await attachment_text(message.attachments, self.settings.attachment_max_bytes, room=limit - len(text))
        if not text and not attached.read_any and has_attachments:
            if facts.guild_id is None or facts.mentions_me:
                await self.tell(message, NOT_READABLE)
            else:  # an image or a sticker in a channel the bot answers: not meant for it
                log.debug("message without text ignored", extra={"discord_message": message.id})
            return
        text = SEPARATOR.join(part for part in (text, attached.text) if part)
        thread = await self.open_thread(message, text) if opens_thread(self.settings, facts) else None
        author = message.author.display_name if facts.guild_id else None
        try:
            submitted = await self.submit(message, text, author=author, channel=thread or message.channel)
        except RejectedMessage as rejected:
            if thread:
                await self.delete_thread(thread)
            await self.tell(message, str(rejected))
            return
        if not submitted.duplicate and attached.cut:
            await self.tell(message, attached.cut_notice(limit))

    async def open_thread(self, message: discord.Message, text: str) -> discord.Thread | None:
        """A thread opened on the message, or None when Discord refuses (then the answer goes in the channel)."""
        try:
            return await message.create_thread(name=thread_title(text))
        except discord.HTTPException as error:  # no permission to create threads
            log.warning("could not open a thread", extra={"discord_message": message.id, "error": str(error)})
            return None

    async def delete_thread(self, thread: discord.Thread) -> None:
        """Delete the thread opened for a message that was then refused: it would stay empty for good."""
        try:
            await thread.delete()
        except discord.HTTPException as error:  # deleting a thread, even its own, needs Manage Threads
            log.warning("could not delete an unused thread", extra={"thread": thread.id, "error": str(error)})

    async def submit(self, message: discord.Message, text: str, author: str | None, channel) -> Submitted:
        """Queue the message as a job of `channel`'s conversation (its own, or the thread opened on it).

        Raises RejectedMessage, with the sentence for the user, when it is not queued.
        """
        message_id = str(message.id)
        # Typing starts before the job exists: its reply can begin before submit returns.
        started = self.typing.start(channel, message_id)
        try:
            submitted = await self.queue.submit(
                conversation_of(channel.id), message_id, text, author=author,
                reply_to=reply_route(channel.id, message.id), author_id=str(message.author.id),
                scope=scope_of(message.guild, channel),
            )
        except RejectedMessage:
            self.typing.stop(message_id)
            raise
        except (*REDIS_DOWN, RedisError) as error:  # down, or refusing writes (full, read-only)
            self.typing.stop(message_id)
            log.error("could not queue a message", extra={"discord_message": message.id, "error": str(error)})
            raise RejectedMessage(UNAVAILABLE) from error
        if submitted.duplicate:
            # A redelivered gateway event: the first delivery is being answered.
            if started:
                self.typing.stop(message_id)
            return submitted
        log.info(
            "message queued",
            extra={"job": submitted.job_id, "conversation": conversation_of(channel.id).key, "ahead": submitted.ahead},
        )
        if submitted.ahead >= self.settings.queue_notice_threshold:
            await self.tell(message, QUEUE_NOTICE.format(position=submitted.ahead + 1))
        return submitted

    async def tell(self, message: discord.Message, text: str) -> None:
        try:
            await message.reply(text, mention_author=False)
        except discord.HTTPException as error:
            log.warning("could not answer in the channel", extra={"discord_message": message.id, "error": str(error)})
