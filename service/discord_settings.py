"""The `discord:` section of config.yaml (validated at start with the rest of the settings)."""

from __future__ import annotations

from pydantic import Field, model_validator

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
    message_content: bool = Field(
        True, description="request the privileged Message Content intent; false: answer only mentions, DMs and slash commands"
    )
    shard_count: int | None = Field(
        None, ge=1, description="gateway shards of the whole bot; unset: the count Discord recommends, all run by this process"
    )
    shard_ids: list[int] | None = Field(
        None, min_length=1, description="the shards this process runs (needs shard_count); unset: all of them"
    )
    identify_spacing_s: float = Field(
        5.0, ge=0, description="Discord's least time between two session starts of one rate-limit bucket; change only for a test gateway"
    )

    @model_validator(mode="after")
    def _shards_fit_the_count(self) -> DiscordSettings:
        if self.shard_ids is None:
            return self
        if self.shard_count is None:
            raise ValueError("shard_ids needs shard_count: the shards of every process together")
        if outside := [shard for shard in self.shard_ids if not 0 <= shard < self.shard_count]:
            raise ValueError(f"shard_ids {outside} are not below shard_count ({self.shard_count})")
        if len(set(self.shard_ids)) != len(self.shard_ids):
            raise ValueError(f"shard_ids lists a shard twice: {self.shard_ids}")
        return self
