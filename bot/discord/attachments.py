"""Discord attachments read as part of a message: the rules are bot/attachments_text.py's."""

from __future__ import annotations

import logging

import discord

from bot.attachments_text import SEPARATOR as SEPARATOR  # client.py joins the message's parts with it
from bot.attachments_text import Attached, AttachedFile, attached_text, is_text

log = logging.getLogger(__name__)

NOT_READABLE = "I can read text and text files (.txt, .md, code), but not images or stickers."


def is_text_file(attachment: discord.Attachment) -> bool:
    return is_text(attachment.filename, attachment.content_type)


async def attachment_text(attachments: list[discord.Attachment], max_bytes: int, room: int) -> Attached:
    """What the attachments add to the message's text, in at most `room` characters (bot.attachments_text.attached_text)."""
    files = [
        AttachedFile(attachment.filename, await read_text(attachment, max_bytes), "too large" if is_text_file(attachment) else "not a text file")
        for attachment in attachments
    ]
    return attached_text(files, room)


async def read_text(attachment: discord.Attachment, max_bytes: int) -> str | None:
    """The attachment's text, or None for a file that is not text, too large, or could not be downloaded."""
    if not is_text_file(attachment) or attachment.size > max_bytes:
        return None
    try:
        return (await attachment.read()).decode("utf-8", "replace").strip()
    except discord.HTTPException as error:
        log.warning("attachment not read", extra={"file": attachment.filename, "error": str(error)})
        return None
