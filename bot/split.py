"""Split a reply into messages under a platform's length limit, at line or word boundaries.

A cut inside a ``` code block is avoided by cutting before the block; a block longer than
one message is closed at the cut and reopened (with its language) in the next message.
"""

from __future__ import annotations

FENCE = "```"
MIN_LIMIT = 64


def _open_block(text: str) -> tuple[int, str] | None:
    """(offset, opening line) of a code block still open at the end of `text`, if any."""
    offset, opening = 0, None
    for line in text.split("\n"):
        if line.lstrip().startswith(FENCE):
            opening = None if opening else (offset, line.strip()[:16])
        offset += len(line) + 1
    return opening


def _boundary(text: str, limit: int) -> int:
    """Where to cut so the first part fits `limit`: the last blank line, newline or space; else hard."""
    for separator in ("\n\n", "\n", " "):
        at = text.rfind(separator, 0, limit + 1)
        if at > limit // 4:  # a cut near the start would leave a tiny message
            return at
    return limit


def split_message(text: str, limit: int) -> list[str]:
    if limit < MIN_LIMIT:
        raise ValueError(f"message limit must be at least {MIN_LIMIT} characters")
    chunks: list[str] = []
    while len(text) > limit:
        cut = _boundary(text, limit)
        block = _open_block(text[:cut])
        if block is None:
            chunks.append(text[:cut].rstrip())
            text = text[cut:].lstrip()
        elif block[0] > 0:
            chunks.append(text[: block[0]].rstrip())
            text = text[block[0]:]
        else:
            opening = block[1]
            cut = _boundary(text, limit - len(FENCE) - 1)
            chunks.append(text[:cut].rstrip("\n") + "\n" + FENCE)
            text = opening + "\n" + text[cut:].lstrip("\n")
    chunks.append(text)
    return [chunk for chunk in chunks if chunk.strip()] or [text]
