"""Text attachments read as part of a message (as llmcord does); other attachments only named."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import PurePath

import discord

log = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset(
    ".txt .md .rst .log .csv .tsv .json .yaml .yml .toml .ini .cfg .xml .html .css .js .ts .tsx .jsx .py .rb .go .rs "
    ".java .kt .c .h .cpp .hpp .cs .php .sh .bash .sql .swift .lua .r .scala .pl".split()
)
NOT_READABLE = "I can read text and text files (.txt, .md, code), but not images or stickers."
SEPARATOR = "\n\n"  # before each attachment's part of the message


@dataclass(frozen=True)
class Attached:
    """What a message's attachments add to its text."""

    text: str
    read_any: bool
    cut: tuple[str, ...]  # names of the text files cut (or, with no room left at all, left out) to fit


def is_text_file(attachment: discord.Attachment) -> bool:
    content_type = (attachment.content_type or "").split(";")[0]
    return content_type.startswith("text/") or PurePath(attachment.filename).suffix.lower() in TEXT_SUFFIXES


async def attachment_text(attachments: list[discord.Attachment], max_bytes: int, room: int) -> Attached:
    """What the attachments add to the message's text, each part after a SEPARATOR, in at most `room`
    characters: text files in full while they fit, then cut to the room left."""
    parts, cut, read_any = [], [], False
    for attachment in attachments:
        space = room - len(SEPARATOR)
        content = await read_text(attachment, max_bytes)
        if content is None:
            why = "too large" if is_text_file(attachment) else "not a text file"
            part = f"(attached, not read: {attachment.filename}, {why})"
        else:
            read_any = True
            part = f"--- {attachment.filename} ---\n{content}"
            if len(part) > space:
                part = start_of_file(attachment.filename, content, space)
                cut.append(attachment.filename)
        # Left out when not even a file's heading, or a note, fits: the room is the message limit's.
        if part and len(part) <= space:
            parts.append(part)
            room = space - len(part)
    return Attached(text=SEPARATOR.join(parts), read_any=read_any, cut=tuple(cut))


async def read_text(attachment: discord.Attachment, max_bytes: int) -> str | None:
    """The attachment's text, or None for a file that is not text, too large, or could not be downloaded."""
    if not is_text_file(attachment) or attachment.size > max_bytes:
        return None
    try:
        return (await attachment.read()).decode("utf-8", "replace").strip()
    except discord.HTTPException as error:
        log.warning("attachment not read", extra={"file": attachment.filename, "error": str(error)})
        return None


def start_of_file(filename: str, content: str, space: int) -> str:
    """The file's part of the message cut to `space` characters, its heading saying so; empty when even the heading does not fit."""
    # With the whole length in both places the heading is at least as long as the one written.
    kept = first_lines(content, space - len(cut_heading(filename, len(content), len(content))))
    return cut_heading(filename, len(kept), len(content)) + kept if kept else ""


def cut_heading(filename: str, kept: int, total: int) -> str:
    return f"--- {filename} (cut: first {kept:,} of {total:,} characters) ---\n"


def first_lines(text: str, limit: int) -> str:
    """The start of `text` within `limit` characters, ending at a line break unless that would waste more than half."""
    if limit <= 0:
        return ""
    start = text[:limit]
    line_end = start.rfind("\n")
    # A file of few, long lines (minified code) is better cut mid-line than mostly dropped.
    return start[:line_end] if line_end > limit // 2 else start
