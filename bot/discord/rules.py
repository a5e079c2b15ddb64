"""Which Discord messages the bot answers, and the text it queues for them.

Plain functions over `Seen`, the facts of one message, so the rules read and test apart
from discord.py's objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from contract.jobs import RejectedMessage, clean_text, is_blank
from service.discord_settings import DiscordSettings

_SPACES = re.compile(r"[ \t]{2,}")
_USER_MENTION = re.compile(r"<@!?(\d+)>")


@dataclass(frozen=True)
class Seen:
    guild_id: int | None  # None in a DM
    channel_id: int
    parent_id: int | None  # a thread's channel: allow-lists name channels, not each thread
    role_ids: frozenset[int]
    from_bot: bool
    system: bool
    mentions_me: bool


def refusal(settings: DiscordSettings, seen: Seen) -> str | None:
    """Why the message is not answered, or None if it is."""
    if seen.from_bot:
        return "from a bot"
    if seen.system:
        return "system message"
    if seen.guild_id is None:
        return None if settings.allow_dms else "direct messages are off"
    if settings.guilds and seen.guild_id not in settings.guilds:
        return "guild not allowed"
    channels = {seen.channel_id, seen.parent_id} - {None}
    if settings.channels and not channels & set(settings.channels):
        return "channel not allowed"
    if settings.roles and not seen.role_ids & set(settings.roles):
        return "author has no allowed role"
    # Without the Message Content intent Discord sends a server message's text only when it mentions
    # the bot (a reply to the bot does, unless its ping is turned off).
    mention_only = settings.mention_only or not settings.message_content or bool(channels & set(settings.mention_only_channels))
    if mention_only and not seen.mentions_me:
        return "bot not mentioned"
    return None


def reset_refusal(settings: DiscordSettings, seen: Seen) -> str | None:
    """Why /reset is refused, or None: the rules of chatting, with `reset_roles` (when set) in place of `roles`."""
    return refusal(settings.model_copy(update={"roles": settings.reset_roles or settings.roles}), seen)


def text_refusal(text: str, has_attachments: bool, max_chars: int) -> str | None:
    """The Intake's refusal of the message's own text (empty, or too long), or None.

    Asked before a file is downloaded or a thread opened for the message. Attachments (and stickers)
    are not counted: files are cut to fit, and a message of nothing else is judged once they are read.
    """
    if has_attachments and is_blank(text):
        return None
    try:
        clean_text(text, max_chars)
    except RejectedMessage as refused:
        return str(refused)
    return None


def message_text(content: str, bot_id: int, names: dict[int, str]) -> str:
    """The text to queue: the bot's own mention removed, other users' mentions as @name."""

    def name(match: re.Match[str]) -> str:
        user_id = int(match.group(1))
        if user_id == bot_id:
            return ""
        return f"@{names[user_id]}" if user_id in names else match.group(0)

    return _SPACES.sub(" ", _USER_MENTION.sub(name, content)).strip()


def opens_thread(settings: DiscordSettings, seen: Seen) -> bool:
    """A channel message answered in a thread of its own (never in a DM or inside a thread)."""
    if seen.guild_id is None or seen.parent_id is not None:
        return False
    return settings.threads or seen.channel_id in settings.thread_channels
