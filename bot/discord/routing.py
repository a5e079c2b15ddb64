"""How Discord ids map onto the queue: conversations, job ids, and where replies go."""

from __future__ import annotations

import discord

from contract.jobs import Conversation, Scope

PLATFORM = "discord"


def conversation_of(channel_id: int) -> Conversation:
    # A thread has its own channel id, so it is its own conversation.
    return Conversation(platform=PLATFORM, channel=str(channel_id))


def scope_of(guild: discord.Guild | None, channel) -> Scope:
    """Where a message was written: its guild and channel, a thread's parent channel for a thread."""
    parent = channel.parent_id if isinstance(channel, discord.Thread) else channel.id
    return Scope(platform=PLATFORM, workspace=str(guild.id) if guild else None, channel=str(parent))


def job_id_of(message_id: int | str) -> str:
    """The job a Discord message becomes (Intake.submit's naming): one per message, ever."""
    return f"{PLATFORM}:{message_id}"


def message_id_of(job_id: str) -> str:
    """The Discord message a job answers (the inverse of job_id_of)."""
    return job_id.removeprefix(f"{PLATFORM}:")


def reply_route(channel_id: int, message_id: int) -> dict[str, str]:
    """A job's reply_to: the channel the answer goes to and the message it answers."""
    return {"channel": str(channel_id), "message": str(message_id)}
