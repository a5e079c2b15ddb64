"""Personas: the system prompt a message is answered with, by where it was written.

Most specific first: the channel's persona set at run time by an admin (Discord's /persona,
Slack's), the channel's in config.yaml, its workspace's in config.yaml, then the global
`system_prompt`. Run-time personas live in Redis (`personas`), so every adapter and worker
process sees one as soon as it is set. A persona is used byte for byte (no date or name in it),
so a conversation's prompts keep one prefix from turn to turn and a prefix cache keeps hitting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from contract import keys
from contract.jobs import Scope, most_specific
from service.config import Settings

MAX_PERSONA_CHARS = 4000  # a persona is part of every prompt's budget: the worker refuses one that leaves no room


@dataclass(frozen=True)
class SystemPrompt:
    text: str
    source: Literal["run time", "channel in config.yaml", "workspace in config.yaml", "global system_prompt"]


class Personas:
    def __init__(self, redis: Redis, settings: Settings):
        self.redis = redis
        self.settings = settings

    async def set(self, scope: Scope, text: str) -> None:
        text = text.strip()
        if not text:
            raise ValueError("A persona cannot be empty: to go back to the default, clear it.")
        if len(text) > MAX_PERSONA_CHARS:
            raise ValueError(f"A persona can be at most {MAX_PERSONA_CHARS:,} characters long (this one has {len(text):,}).")
        await self.redis.hset(keys.PERSONAS, field(scope), text)

    async def clear(self, scope: Scope) -> bool:
        """Forget the channel's run-time persona; False when it had none."""
        return bool(await self.redis.hdel(keys.PERSONAS, field(scope)))

    async def system_prompt(self, scope: Scope | None) -> SystemPrompt:
        if scope is not None:
            chosen = await self.redis.hget(keys.PERSONAS, field(scope))
            if chosen is not None:
                return SystemPrompt(chosen, "run time")
        return configured(self.settings, scope)


def field(scope: Scope) -> str:
    return f"{scope.platform}:{scope.channel}"


def configured(settings: Settings, scope: Scope | None) -> SystemPrompt:
    """The system prompt config.yaml gives messages written in `scope`."""
    found = most_specific(settings.personas, scope)
    if found is None:
        return SystemPrompt(settings.system_prompt.strip(), "global system_prompt")
    persona, level = found
    return SystemPrompt(persona.system_prompt.strip(), f"{level} in config.yaml")
