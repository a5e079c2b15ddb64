"""What crosses Redis between adapters and the worker: jobs in, reply events out."""

from __future__ import annotations

import argparse
import re
import time
import unicodedata
from collections.abc import Sequence
from typing import Literal, Protocol, TypeVar

from pydantic import BaseModel, Field

EMPTY_MESSAGE = "Your message is empty, so there is nothing to answer."
UNAVAILABLE = "Sorry, I cannot take messages right now. Please try again in a minute."  # Redis down or full


class Conversation(BaseModel):
    """One conversation: a channel or DM on a platform, optionally a thread inside it."""

    model_config = {"frozen": True}
    platform: str = Field(pattern=r"^[a-z0-9_-]+$")
    channel: str = Field(min_length=1)
    thread: str | None = None

    @property
    def key(self) -> str:
        return ":".join(p for p in (self.platform, self.channel, self.thread) if p)

    @classmethod
    def parse(cls, key: str) -> Conversation:
        """'platform:channel[:thread]', as `key` writes it and the logs show it."""
        platform, _, rest = key.partition(":")
        channel, _, thread = rest.partition(":")
        if not re.fullmatch(r"[a-z0-9_-]+", platform) or not channel:
            raise ValueError(
                f"{key!r} is not a conversation id: they look like platform:channel, "
                f"e.g. cli:{channel or platform or 'default'} or discord:1234567890"
            )
        return cls(platform=platform, channel=channel, thread=thread or None)


def conversation_argument(text: str) -> Conversation:
    """argparse type: a bad id is reported by argparse as one line, with the usage."""
    try:
        return Conversation.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class Scope(BaseModel):
    """Where a message was written, in platform-neutral terms.

    The worker may read it to choose the channel's persona, and learns nothing else about
    platforms. A thread's scope is its parent channel: what is set for a channel holds in its threads.
    """

    model_config = {"frozen": True}
    platform: str
    workspace: str | None = None  # a Discord guild, a Slack team; None in DMs without one and on the terminal
    channel: str


class ScopeRule(Protocol):
    platform: str
    workspace: str | None
    channel: str | None


Rule = TypeVar("Rule", bound=ScopeRule)


def most_specific(rules: Sequence[Rule], scope: Scope | None) -> tuple[Rule, Literal["channel", "workspace"]] | None:
    """The rule for the scope's channel, else for its workspace, with which of the two it is; None if neither has one."""
    if scope is None:
        return None
    for rule in rules:
        if rule.platform == scope.platform and rule.channel == scope.channel:
            return rule, "channel"
    for rule in rules:
        if rule.platform == scope.platform and rule.channel is None and rule.workspace == scope.workspace:
            return rule, "workspace"
    return None


class Job(BaseModel):
    id: str  # "<platform>:<platform message id>": the same message is never answered twice
    conversation: str
    platform: str
    text: str
    author: str | None = None  # display name, rendered into the prompt in shared channels
    author_id: str | None = None  # the platform's user id, for per-person limits
    reply_to: dict[str, str] = Field(default_factory=dict)  # adapter routing data, opaque to the engine
    scope: Scope | None = None  # set by every adapter; None only on jobs queued before scopes existed
    replaces: str | None = None  # a regeneration: the id of the answer (the conversation's latest) it replaces
    pool: str = "default"  # the workers that answer it (contract/pools.py), chosen from its scope at submission
    submitted_at: float = Field(default_factory=time.time)
    epoch: int = 0  # the conversation's reset count when the job was submitted
    attempts: int = 0  # deliveries served alone after a worker died with the job (contract/work.py: suspects)
    server_faults: int = 0  # times a model server failed its request and it was handed back (engine/worker.py)


class ReplyEvent(BaseModel):
    job_id: str
    conversation: str
    kind: Literal["partial", "final", "error"]
    text: str  # the whole reply so far: adapters can drop any partial but the last
    reply_to: dict[str, str] = Field(default_factory=dict)
    # A regeneration's events: its text goes into the messages of the answer it replaces, except an error,
    # which is a note shown apart, the old answer left (or, after partials overwrote it, shown again) as `restore`.
    replaces: str | None = None
    restore: str | None = None
    author_id: str | None = None  # the asker's platform user id: erasing a person finds their replies by it

    @classmethod
    def of(cls, job: Job, kind: Literal["partial", "final", "error"], text: str, restore: str | None = None) -> ReplyEvent:
        return cls(
            job_id=job.id, conversation=job.conversation, kind=kind, text=text, reply_to=job.reply_to,
            replaces=job.replaces, restore=restore if job.replaces else None, author_id=job.author_id,
        )


class Submitted(BaseModel):
    job_id: str
    ahead: int  # jobs queued before this one, across conversations, that no worker has started
    duplicate: bool = False


class RejectedMessage(ValueError):
    """A message the service will not queue; the text is meant for the user."""


def is_blank(text: str) -> bool:
    """Nothing a reader would see: whitespace, control and invisible format characters (zero-width spaces...)."""
    return all(char.isspace() or unicodedata.category(char) in ("Cc", "Cf") for char in text)


def clean_text(text: str, max_chars: int) -> str:
    """Make a platform message safe to queue, or refuse it with a sentence for the user."""
    # Lone surrogates (from broken clients) cannot be encoded as UTF-8; replace rather than refuse.
    text = text.encode("utf-8", "replace").decode("utf-8")
    if is_blank(text):
        raise RejectedMessage(EMPTY_MESSAGE)
    if len(text) > max_chars:
        raise RejectedMessage(f"Your message is {len(text):,} characters long; the limit is {max_chars:,}.")
    return text
