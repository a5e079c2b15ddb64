"""Which Slack events the bot answers, and how text reads on either side.

Plain functions over event payloads, so the rules read and test apart from bolt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from contract.jobs import Conversation, Scope

PLATFORM = "slack"
# Plain messages, those that share files, and thread replies also shown in the channel. Edits,
# deletions, joins... carry other subtypes.
ANSWERED_SUBTYPES = frozenset({None, "file_share", "thread_broadcast"})
_ANGLE = re.compile(r"<([^<>]*)>")
_SPACES = re.compile(r"[ \t]{2,}")


@dataclass(frozen=True)
class SharedFile:
    """A file shared with a message, as the event describes it."""

    name: str
    mimetype: str
    size: int
    url: str  # url_private_download, read with the bot token; empty when Slack gives none (a Slack Connect file)


@dataclass(frozen=True)
class Incoming:
    """A message to queue, with where its answer goes."""

    conversation: Conversation
    message_id: str  # the event's ts scoped by channel: Slack's retried deliveries carry the same one
    text: str
    user: str | None
    reply_to: dict[str, str]  # channel, thread_ts; team (enterprise on Grid), user: streams, rate budgets, the token
    in_dm: bool
    starts_thread: bool  # a top-level DM message: it opens a new thread, and a new conversation
    files: tuple[SharedFile, ...] = ()
    team: str | None = None

    @property
    def scope(self) -> Scope:
        return Scope(platform=PLATFORM, workspace=self.team, channel=self.conversation.channel)


def _answerable(event: dict) -> bool:
    # Bots would answer each other.
    return event.get("subtype") in ANSWERED_SUBTYPES and not event.get("bot_id") and "ts" in event and "channel" in event


def shared_files(event: dict) -> tuple[SharedFile, ...]:
    return tuple(
        SharedFile(
            name=file.get("name") or file.get("title") or file.get("id", "file"), mimetype=file.get("mimetype", ""),
            size=int(file.get("size") or 0), url=file.get("url_private_download", ""),
        )
        for file in event.get("files") or []
    )


def workspace(team: str | None, enterprise: str | None) -> dict[str, str]:
    """The workspace as reply_to names it: which rate budget a call takes from, and which bot token it uses."""
    return {**({"team": team} if team else {}), **({"enterprise": enterprise} if enterprise else {})}


def _incoming(event: dict, team: str | None, text: str, enterprise: str | None) -> Incoming:
    channel, thread = event["channel"], event.get("thread_ts") or event["ts"]
    user = event.get("user")
    in_dm = event.get("channel_type") == "im"
    return Incoming(
        conversation=Conversation(platform=PLATFORM, channel=channel, thread=thread),
        message_id=f"{channel}-{event['ts']}",
        text=text,
        user=user,
        reply_to={"channel": channel, "thread_ts": thread, **workspace(team, enterprise), **({"user": user} if user else {})},
        in_dm=in_dm,
        starts_thread=in_dm and "thread_ts" not in event,
        files=shared_files(event),
        team=team,
    )


def direct_message(event: dict, team: str | None, enterprise: str | None = None) -> Incoming | None:
    """A `message` event worth answering: a person writing in a DM with the bot.

    As in Slack's agent apps, each thread is a conversation: a top-level message starts a
    new one, answered in the thread it opens.
    """
    if event.get("channel_type") != "im" or not _answerable(event):
        return None
    return _incoming(event, team, from_slack(event.get("text", "")), enterprise)


def mention(event: dict, team: str | None, bot_user_id: str | None, enterprise: str | None = None) -> Incoming | None:
    """An `app_mention` worth answering: answered in its thread, which is its own conversation."""
    if not _answerable(event):
        return None
    return _incoming(event, team, from_slack(event.get("text", ""), drop_user=bot_user_id), enterprise)


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


_PINGS = re.compile(r"<(?=[@!#])|@(?=(?:here|channel|everyone)\b)")


def to_markdown(text: str) -> str:
    """Model text as Slack markdown that can never ping: `<@U1>`, `<!channel>`, `@here` get a zero-width space."""
    return _PINGS.sub(lambda match: match.group(0) + "\u200b", text)
