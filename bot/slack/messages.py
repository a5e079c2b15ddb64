"""Which Slack events the bot answers, and how text reads on either side.

Plain functions over event payloads, so the rules read and test apart from bolt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.jobs import Conversation

PLATFORM = "slack"
_ANGLE = re.compile(r"<([^<>]*)>")
_SPACES = re.compile(r"[ \t]{2,}")


@dataclass(frozen=True)
class Incoming:
    """A message to queue, with where its answer goes."""

    conversation: Conversation
    message_id: str  # the event's ts scoped by channel: Slack's retried deliveries carry the same one
    text: str
    user: str | None
    reply_to: dict[str, str]


def _answerable(event: dict) -> bool:
    # Edits, deletions, joins, file shares... all carry a subtype; bots would answer each other.
    return not event.get("subtype") and not event.get("bot_id") and "ts" in event and "channel" in event


def direct_message(event: dict) -> Incoming | None:
    """A `message` event worth answering: a person writing in a DM with the bot."""
    if event.get("channel_type") != "im" or not _answerable(event):
        return None
    channel = event["channel"]
    # The whole DM is one conversation, but an answer goes where the question was asked.
    reply_to = {"channel": channel, **({"thread_ts": event["thread_ts"]} if event.get("thread_ts") else {})}
    return Incoming(
        conversation=Conversation(platform=PLATFORM, channel=channel),
        message_id=f"{channel}-{event['ts']}",
        text=from_slack(event.get("text", "")),
        user=event.get("user"),
        reply_to=reply_to,
    )


def mention(event: dict, bot_user_id: str | None) -> Incoming | None:
    """An `app_mention` worth answering: answered in its thread, which is its own conversation."""
    if not _answerable(event):
        return None
    channel, thread = event["channel"], event.get("thread_ts") or event["ts"]
    return Incoming(
        conversation=Conversation(platform=PLATFORM, channel=channel, thread=thread),
        message_id=f"{channel}-{event['ts']}",
        text=from_slack(event.get("text", ""), drop_user=bot_user_id),
        user=event.get("user"),
        reply_to={"channel": channel, "thread_ts": thread},
    )


def from_slack(text: str, drop_user: str | None = None) -> str:
    """Slack's markup as a person reads it: `<@U1>` -> @U1, `<url|label>` -> label (url), entities decoded."""

    def plain(match: re.Match) -> str:
        target, _, label = match.group(1).partition("|")
        if target == f"@{drop_user}":
            return ""
        if target.startswith("@"):
            return target
        if target.startswith("#"):
            return f"#{label}" if label else target
        if target.startswith("!"):  # <!here>, <!channel>, <!subteam^S1|@team>
            return label or "@" + target[1:].split("^")[0]
        return f"{label} ({target})" if label and label != target else target

    text = _ANGLE.sub(plain, text)
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return _SPACES.sub(" ", text).strip()


def to_slack(text: str) -> str:
    """Model text as literal Slack text: escaping <, > and & means it can never ping @channel or a user."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
