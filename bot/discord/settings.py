"""The `discord:` section of config.yaml (validated at start with the rest of the settings)."""

from __future__ import annotations

from pydantic import Field

from service.strict import Strict


class DiscordSettings(Strict):
    guilds: list[int] = Field(default_factory=list, description="allowed guild ids; empty allows all")
    channels: list[int] = Field(default_factory=list, description="allowed channel ids; empty allows all")
    roles: list[int] = Field(default_factory=list, description="roles allowed to chat; empty allows all")
    reset_roles: list[int] = Field(default_factory=list, description="roles allowed to /reset in servers; empty: the roles allowed to chat")
    allow_dms: bool = True
    mention_only_channels: list[int] = Field(default_factory=list, description="channels where only mentions are answered")
    mention_only: bool = False
    edit_interval_s: float = Field(1.0, ge=1.0)
    queue_notice_threshold: int = Field(3, ge=1)
    attachment_max_bytes: int = Field(100_000, ge=0, description="text attachments up to this size are read with the message (cut to fit limits.max_message_chars)")
    threads: bool = Field(False, description="answer channel messages in a thread opened on them, everywhere")
    thread_channels: list[int] = Field(default_factory=list, description="channels where answers go in a new thread")
