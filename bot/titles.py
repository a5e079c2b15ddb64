"""A thread's title from its first message, for both platforms' threads."""

from __future__ import annotations


def thread_title(text: str, limit: int = 80) -> str:
    """The message's first line, cut at a word (Discord allows 100 characters; Slack shows about 80)."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "") or "Conversation"
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(" ,.;:") + "…"
