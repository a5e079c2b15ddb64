"""Split a reply into messages under a platform's length limit, at line or word boundaries.

A cut inside a ``` code block is avoided by cutting before the block; a block longer than
one message is closed at the cut and reopened (with its language) in the next message. A ```
counts wherever it stands on a line (`Here: ```python` opens a block), as Discord and Slack see it.
"""

from __future__ import annotations

import re

FENCE = "```"
CLOSING = "\n" + FENCE
MIN_LIMIT = 64
# A longer first line is code, not a language tag; the cap also keeps a reopened block's
# first line short enough that every message still carries some of the block.
LANGUAGE = re.compile(r"[^\s`]{1,16}")


def split_message(text: str, limit: int) -> list[str]:
    if limit < MIN_LIMIT:
        raise ValueError(f"message limit must be at least {MIN_LIMIT} characters")
    chunks: list[str] = []
    while len(text) > limit:
        chunk, text = _next_message(text, limit)
        chunks.append(chunk)
    chunks.append(text)
    return [chunk for chunk in chunks if chunk.strip()] or [text[:limit]]


def _next_message(text: str, limit: int) -> tuple[str, str]:
    """The first message cut from `text`, and what is left; the left text is always shorter."""
    fences = _fences(text)
    cut = _clear_of_fences(_boundary(text, limit, limit // 4), fences)
    block = _open_block(fences, cut)
    if block is None:
        return text[:cut].rstrip(), text[cut:].lstrip()
    if block > 0:
        return text[:block].rstrip(), text[block:]
    reopening = FENCE + _language(text)
    room = limit - len(CLOSING)
    # Past the reopening line: the left text, reopened, must be shorter than `text`.
    cut = _clear_of_fences(_boundary(text, room, max(room // 4, len(reopening) + 1)), fences)
    return text[:cut].rstrip("\n") + CLOSING, reopening + "\n" + text[cut:].lstrip("\n")


def _fences(text: str) -> list[int]:
    """Where each ``` starts. Discord and Slack pair them in order wherever they stand on a line."""
    return [match.start() for match in re.finditer(FENCE, text)]


def _boundary(text: str, end: int, after: int) -> int:
    """Where to cut so the first part fits `end`: the last blank line, newline or space past `after`; else hard."""
    for separator in ("\n\n", "\n", " "):
        at = text.rfind(separator, 0, end + 1)
        if at > after:  # a cut near the start would leave a tiny message
            return at
    return end


def _clear_of_fences(cut: int, fences: list[int]) -> int:
    """`cut`, or the start of the ``` it would break in two (neither half would be a fence)."""
    return next((start for start in fences if start < cut < start + len(FENCE)), cut)


def _open_block(fences: list[int], cut: int) -> int | None:
    """Where the code block still open at `cut` starts, if one is."""
    before = [start for start in fences if start + len(FENCE) <= cut]
    return before[-1] if len(before) % 2 else None


def _language(text: str) -> str:
    """The language named on the line of the fence that starts `text`, if that line names one alone."""
    line, newline, _ = text[len(FENCE):].partition("\n")
    return line.strip() if newline and LANGUAGE.fullmatch(line.strip()) else ""
