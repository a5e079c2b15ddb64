"""Text attachments read as part of a message (as llmcord does); other attachments only named."""

from __future__ import annotations

import logging
from pathlib import PurePath

import discord

log = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset(
    ".txt .md .rst .log .csv .tsv .json .yaml .yml .toml .ini .cfg .xml .html .css .js .ts .tsx .jsx .py .rb .go .rs "
    ".java .kt .c .h .cpp .hpp .cs .php .sh .bash .sql .swift .lua .r .scala .pl".split()
)
NOT_READABLE = "I can read text and text files (.txt, .md, code), but not images or stickers."


def is_text_file(attachment: discord.Attachment) -> bool:
    content_type = (attachment.content_type or "").split(";")[0]
    return content_type.startswith("text/") or PurePath(attachment.filename).suffix.lower() in TEXT_SUFFIXES


async def attachment_text(attachments: list[discord.Attachment], max_bytes: int) -> tuple[str, bool]:
    """What the attachments add to the message's text, and whether any was read."""
    parts, read = [], False
    for attachment in attachments:
        if is_text_file(attachment) and attachment.size <= max_bytes:
            try:
                content = (await attachment.read()).decode("utf-8", "replace")
            except discord.HTTPException as error:
                log.warning("attachment not read", extra={"file": attachment.filename, "error": str(error)})
            else:
                parts.append(f"--- {attachment.filename} ---\n{content.strip()}")
                read = True
                continue
        why = "too large" if is_text_file(attachment) else "not a text file"
        parts.append(f"(attached, not read: {attachment.filename}, {why})")
    return "\n\n".join(parts), read
