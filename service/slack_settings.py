"""The `slack:` section of config.yaml (validated at start with the rest of the settings)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from service.strict import Strict


class SuggestedPrompt(Strict):
    title: str = Field(min_length=1, max_length=75)
    message: str = Field(min_length=1)


# Calls per minute per workspace at Slack's published tiers (chat.postMessage: per channel); the
# three Tier 4 methods at the bottom are best-effort (a title, the suggested prompts, a name).
SLACK_RATE_LIMITS = {
    "chat.postMessage": 60,
    "chat.update": 50,
    "chat.delete": 50,
    "chat.startStream": 20,
    "chat.appendStream": 100,
    "chat.stopStream": 20,
    "chat.postEphemeral": 100,
    "agents.sessions.setStatus": 50,
    "assistant.threads.setStatus": 50,
    "assistant.threads.setTitle": 100,
    "assistant.threads.setSuggestedPrompts": 100,
    "users.info": 100,
}


class SlackSettings(Strict):
    mode: Literal["socket", "http"] = "socket"
    api_url: str = Field("https://slack.com/api/", pattern=r"^https?://.+/$", description="Slack's Web API; https://slack-gov.com/api/ on GovSlack")
    http_port: int = Field(3000, ge=1, le=65535)
    answer_mentions: bool = False
    reset_command: str = Field("/reset", pattern=r"^/[a-z0-9_-]+$")
    persona_command: str = Field("/persona", pattern=r"^/[a-z0-9_-]+$")
    admin_user_ids: list[Annotated[str, Field(pattern=r"^[UW][A-Z0-9]{2,}$")]] = Field(
        default_factory=list, description="Slack user ids (U…) who may use persona_command; empty: nobody"
    )
    edit_interval_s: float = Field(1.0, ge=0.5)
    streaming: bool = Field(True, description="native streaming (chat.startStream); false: post, then chat.update")
    stream_buffer_chars: int = Field(128, ge=1, description="new text gathered before one chat.appendStream")
    status: str = Field("is thinking…", min_length=1, max_length=50)
    # A round runs every quarter of this, so a status is set again within 1.25x: under Slack's 2 minutes.
    status_refresh_s: float = Field(90.0, ge=1, le=95, description="Slack drops a status after 2 minutes: set again this often")
    loading_messages: list[str] = Field(default_factory=lambda: ["Reading your message…", "Thinking it over…"], max_length=10)
    prompts_title: str = "Try one of these:"
    prompts_interval_s: float = Field(600.0, ge=1, description="suggested prompts are set for a person at most this often")
    suggested_prompts: list[SuggestedPrompt] = Field(
        default_factory=lambda: [
            SuggestedPrompt(title="Explain a concept", message="Explain how a transformer language model works, simply."),
            SuggestedPrompt(title="Draft a message", message="Help me write a short, friendly project update for my team."),
            SuggestedPrompt(title="Brainstorm", message="Give me five ideas for a team offsite."),
        ],
        max_length=4,  # Slack shows at most four
    )
    feedback: bool = Field(True, description="thumbs up/down buttons on each finished answer")
    file_max_bytes: int = Field(100_000, ge=0, description="text files shared with a message are read with it up to this size")
    rate_limits: dict[str, float] = Field(
        default_factory=lambda: dict(SLACK_RATE_LIMITS), description="calls per minute per workspace and method"
    )

    @field_validator("rate_limits")
    @classmethod
    def _known_methods(cls, rates: dict[str, float]) -> dict[str, float]:
        """The tiers, with what the operator set over them (Slack grants some apps more)."""
        unknown = set(rates) - set(SLACK_RATE_LIMITS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; known: {sorted(SLACK_RATE_LIMITS)}")
        if any(rate <= 0 for rate in rates.values()):
            raise ValueError("every rate must be above 0 calls per minute")
        return {**SLACK_RATE_LIMITS, **rates}
