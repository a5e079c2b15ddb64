"""Service configuration: config.yaml validated by pydantic, overridden by the environment.

Secrets (platform tokens, HF token) are never read from the file: they come from the
environment only, through `Secrets`. Every section lives on this floor, the platforms' own
(discord_settings.py, slack_settings.py) included, so that every floor above reads one
typed Settings and `service/` imports nothing from above.
"""

from __future__ import annotations

import os
import socket
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.discord_settings import DiscordSettings
from service.slack_settings import SlackSettings
from service.strict import Strict

ENV_PREFIX = "CHATBOT__"
# Tensor-parallel degrees inf2 instances are used with (engine/neuron/plan.py TP_DEGREES).
NEURON_TP_DEGREES = (1, 2, 4, 8, 12, 24)
# optimum-neuron's on-device sampler accepts top_k in 1..256; 0 ("off" in transformers) fails there.
NEURON_MAX_TOP_K = 256
SECRET_NAMES = (
    "DISCORD_TOKEN",
    "SLACK_BOT_TOKEN",
    "SLACK_APP_TOKEN",
    "SLACK_SIGNING_SECRET",
    "SLACK_CLIENT_ID",  # these three: the app installed in many workspaces (docs/slack.md, "Many workspaces")
    "SLACK_CLIENT_SECRET",
    "SLACK_INSTALLATION_KEY",
    "SLACK_APP_CONFIG_TOKEN",  # only `chatbot doctor` reads it: an app configuration token, to compare the app with its manifest
    "HF_TOKEN",
    "OPENAI_API_KEY",
)


class ModelSettings(Strict):
    id: str = Field("embedded:smollm2", description="embedded:smollm2, embedded:tiny-llama, a local folder or a Hub id")
    backend: Literal["transformers", "neuron", "openai"] = Field(
        "transformers", description="openai: an OpenAI-compatible server generates (section openai); model.id names its tokenizer"
    )
    device: Literal["cpu", "cuda", "auto"] = "auto"
    sequence_length: int = Field(2048, ge=64, description="prompt + output never exceed this (compiled length on Neuron)")
    max_prompt_tokens: int = Field(1536, ge=16)
    batch_size: int = Field(1, ge=1, le=64)
    tensor_parallel_size: int = Field(2, ge=1, description="NeuronCores used by the compiled model")
    max_prefills_per_step: int | None = Field(
        None, ge=1, description="new prompts admitted between two decode steps; unset: 1, or batch_size with backend openai"
    )
    admission: Literal["continuous", "whole_batch"] = Field(
        "continuous", description="whole_batch admits only into an empty batch (the old behaviour, kept for benchmarks)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="transformers backend; auto: bfloat16 on the CPU, float16 on CUDA"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads; unset: torch's default")
    prefix_cache_mb: int = Field(
        512, ge=0, description="transformers backend: KV of ended sequences kept for prompts that begin the same; 0: off"
    )
    truncation_low_water: float = Field(
        1.0,
        gt=0,
        le=1,
        description=(
            "1: a long conversation keeps as many newest exchanges as fit (its prompt's start moves every turn); "
            "below 1: it drops about (1 - this) x max_prompt_tokens more at once, at cut points that stay put, "
            "so successive prompts begin the same (prefix-cache hits) until the budget is full again"
        ),
    )

    @property
    def prefills_per_step(self) -> int:
        # A server prefills the requests it is sent together, while in-process engines prefill one
        # after another and running answers wait meanwhile.
        if self.max_prefills_per_step is not None:
            return self.max_prefills_per_step
        return self.batch_size if self.backend == "openai" else 1

    @model_validator(mode="after")
    def _prompt_leaves_room(self) -> ModelSettings:
        if self.max_prompt_tokens >= self.sequence_length:
            raise ValueError(
                f"max_prompt_tokens ({self.max_prompt_tokens}) must be below sequence_length "
                f"({self.sequence_length}) so the model has room to answer"
            )
        return self


class GenerationSettings(Strict):
    do_sample: bool = False
    temperature: float = Field(0.7, gt=0, le=5)
    top_k: int = Field(50, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    repetition_penalty: float = Field(1.0, ge=1.0, le=3.0)
    max_new_tokens: int = Field(256, ge=1)


class HistorySettings(Strict):
    max_turns: int = Field(40, ge=2, description="turns kept per conversation (a user message and its reply are two)")
    ttl_seconds: int = Field(7 * 24 * 3600, ge=60)


class QueueSettings(Strict):
    visibility_timeout_s: float = Field(60.0, gt=0, description="a job held this long without a heartbeat is delivered again")
    partial_interval_s: float = Field(0.25, ge=0, description="least time between two streamed partial replies")
    reply_stream_maxlen: int = Field(
        10_000, ge=100, description="replies kept where no adapter reads (cli); an adapter's unread replies are never trimmed"
    )
    adapter_lease_s: float = Field(
        15.0,
        gt=0,
        description="an adapter process trusts its hold on reply shards for 2/3 of this after renewing it; one that dies"
        " leaves its conversations' replies to another after about twice this",
    )
    affinity_wait_s: float = Field(
        0.5, ge=0, description="a conversation's next message waits this long for the live worker holding its context; 0: off"
    )
    step_timeout_s: float = Field(
        30.0, gt=0, description="a model step slower than this stops the worker (exit 3) so its supervisor restarts it"
    )

    @model_validator(mode="after")
    def _leases_outlive_a_step(self) -> QueueSettings:
        # Leases are extended between steps, so a step must end well before a lease can expire.
        if self.step_timeout_s > self.visibility_timeout_s / 2:
            raise ValueError(
                f"step_timeout_s ({self.step_timeout_s:g}) must be at most half of visibility_timeout_s "
                f"({self.visibility_timeout_s:g}): leases are extended between model steps"
            )
        return self


class LimitSettings(Strict):
    """What one conversation or one person may hold in the queue; over a limit, a sentence back and nothing queued."""

    max_queued_per_conversation: int = Field(10, ge=1, description="messages waiting for an answer in one conversation")
    max_queued_per_author: int = Field(5, ge=1, description="messages one person has waiting, across conversations")
    messages_per_minute_per_author: int = Field(20, ge=1)
    max_message_chars: int = Field(40_000, ge=100, description="Slack's own limit; Discord's is 2,000 (4,000 with Nitro)")
    daily_tokens_per_author: int | None = Field(
        None, ge=1, description="tokens (prompt and answer) one person may use a day (UTC), checked at submission; unset: no budget"
    )


class OpenAISettings(Strict):
    """The server behind `model.backend: openai` (vLLM, `optimum-cli neuron serve`, any OpenAI-compatible one)."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="up to and including /v1")
    served_model: str | None = Field(None, description="the model name the server serves; unset: model.id")
    timeout_s: float = Field(
        20.0, gt=0, description="the most one model step waits; a request that waited this long while the server sent nothing fails"
    )
    health_interval_s: float = Field(2.0, gt=0, description="how often an unavailable server is asked again")


class ScopeRule(Strict):
    """A setting for one workspace (a Discord guild, a Slack team) or one channel: a channel's beats its workspace's."""

    platform: str = Field(pattern=r"^[a-z0-9_-]+$", description="discord, slack, local")
    workspace: str | None = Field(None, description="guild or team id; unset: any")
    channel: str | None = Field(None, description="channel id (its threads included); unset: the whole workspace")

    @model_validator(mode="after")
    def _names_a_place(self) -> ScopeRule:
        if self.workspace is None and self.channel is None:
            raise ValueError("names a workspace or a channel (what holds everywhere else has its own setting)")
        return self


class Persona(ScopeRule):
    """A system prompt for one workspace or channel, over `system_prompt`."""

    system_prompt: str = Field(min_length=1)


POOL_NAME = r"^[a-z0-9][a-z0-9_-]{0,31}$"


class PoolRoute(ScopeRule):
    """Messages written in one workspace or channel are answered by the workers of a named pool."""

    pool: str = Field(pattern=POOL_NAME)


class PoolSettings(Strict):
    """Named pools of workers (a model each), and which channels each answers."""

    default: str = Field("default", pattern=POOL_NAME, description="the pool of messages no route names")
    serve: str | None = Field(None, pattern=POOL_NAME, description="the pool this process's worker serves; unset: default")
    routes: list[PoolRoute] = Field(default_factory=list, description="workspaces and channels answered by another pool")
    absent_after_s: float = Field(
        120.0, gt=0, description="a message waits this long for a pool with no live worker, then is told none is serving"
    )

    @property
    def served(self) -> str:
        return self.serve or self.default

    @property
    def names(self) -> list[str]:
        """Every pool a message can be routed to, the default first."""
        return list(dict.fromkeys([self.default, *(route.pool for route in self.routes)]))

    @model_validator(mode="after")
    def _serves_a_routed_pool(self) -> PoolSettings:
        if self.served not in self.names:
            raise ValueError(
                f"serve: no message reaches pool {self.served!r}: it is neither `default` nor named by a route "
                f"(pools: {', '.join(self.names)})"
            )
        return self


class MetricsSettings(Strict):
    port: int | None = Field(None, ge=1, le=65535, description="serve /metrics and /healthz here; unset: off")


class Settings(Strict):
    system_prompt: str = (
        "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe."
    )
    redis_url: str | None = Field(None, description="unset: a private redis-server is started under run_dir")
    run_dir: Path = Path("run")
    worker_name: str = Field(
        default_factory=socket.gethostname, description="first part of each worker's identity in logs (a unique suffix is added)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    personas: list[Persona] = Field(
        default_factory=list, description="system prompts per workspace or channel; a channel's beats its workspace's"
    )
    pools: PoolSettings = PoolSettings()
    model: ModelSettings = ModelSettings()
    generation: GenerationSettings = GenerationSettings()
    history: HistorySettings = HistorySettings()
    queue: QueueSettings = QueueSettings()
    limits: LimitSettings = LimitSettings()
    openai: OpenAISettings = OpenAISettings()
    metrics: MetricsSettings = MetricsSettings()
    discord: DiscordSettings = DiscordSettings()
    slack: SlackSettings = SlackSettings()

    @model_validator(mode="after")
    def _server_times_out_before_the_watchdog(self) -> Settings:
        # A silent server must be reported as unavailable (jobs handed back, uncharged) before the
        # step watchdog takes it for a stuck model and stops the worker.
        if self.model.backend == "openai" and self.openai.timeout_s >= self.queue.step_timeout_s:
            raise ValueError(
                f"openai.timeout_s ({self.openai.timeout_s:g}) must be below queue.step_timeout_s "
                f"({self.queue.step_timeout_s:g})"
            )
        return self

    @model_validator(mode="after")
    def _pools_outlive_a_heartbeat(self) -> Settings:
        # A live worker says so every quarter of the visibility timeout (engine/worker.py): a pool
        # must not look absent between two of those.
        if self.pools.absent_after_s < self.queue.visibility_timeout_s:
            raise ValueError(
                f"pools.absent_after_s ({self.pools.absent_after_s:g}) must be at least queue.visibility_timeout_s "
                f"({self.queue.visibility_timeout_s:g})"
            )
        return self

    @model_validator(mode="after")
    def _neuron_rules(self) -> Settings:
        if self.model.backend != "neuron":
            return self
        if self.generation.repetition_penalty != 1.0:
            raise ValueError(
                "generation.repetition_penalty must be 1.0 with the neuron backend "
                "(its on-device sampler never applies it, greedy decoding included)"
            )
        if self.model.tensor_parallel_size not in NEURON_TP_DEGREES:
            raise ValueError(
                f"model.tensor_parallel_size must be one of {', '.join(map(str, NEURON_TP_DEGREES))} "
                f"with the neuron backend, got {self.model.tensor_parallel_size}"
            )
        if self.generation.do_sample and not 1 <= self.generation.top_k <= NEURON_MAX_TOP_K:
            raise ValueError(
                f"generation.top_k must be between 1 and {NEURON_MAX_TOP_K} when sampling with the neuron backend, "
                f"got {self.generation.top_k}"
            )
        return self


class ConfigError(Exception):
    """A configuration problem, worded for the operator."""


class Secrets(BaseModel):
    """Tokens read from the environment only; repr never shows them."""

    model_config = ConfigDict(frozen=True)
    values: dict[str, str] = Field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls) -> Secrets:
        return cls(values={name: os.environ[name] for name in SECRET_NAMES if os.environ.get(name)})

    def get(self, name: str) -> str | None:
        return self.values.get(name)

    def require(self, *names: str) -> dict[str, str]:
        missing = [name for name in names if name not in self.values]
        if missing:
            raise ConfigError(f"missing environment variable(s): {', '.join(missing)}")
        return {name: self.values[name] for name in names}


def _takes_text(path: list[str]) -> bool:
    """Whether the setting at `path` is a string (or a path): its environment value is taken as written."""
    model: type[BaseModel] = Settings
    for part in path[:-1]:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return False
        model = field.annotation
    field = model.model_fields.get(path[-1])
    if field is None:
        return False
    kinds = [kind for kind in (typing.get_args(field.annotation) or (field.annotation,)) if kind is not type(None)]
    return bool(kinds) and all(kind in (str, Path) for kind in kinds)


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """CHATBOT__MODEL__ID=x becomes {"model": {"id": "x"}}; REDIS_URL is accepted as is.

    Values are read as YAML (numbers, booleans, lists), except for string settings: a system
    prompt such as "You are bot #1" must not lose what YAML takes for a comment.
    """
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        node = tree
        *parents, leaf = path = key[len(ENV_PREFIX):].lower().split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = raw if not raw or _takes_text(path) else yaml.safe_load(raw)
    if environ.get("REDIS_URL"):
        tree["redis_url"] = environ["REDIS_URL"]
    return tree


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "literal_error":
            message = f"{message}, got {item['input']!r}"
        elif item["type"] == "extra_forbidden":
            message = "unknown setting"
        lines.append(f"  {field}: {message}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Read config.yaml (path, $CHATBOT_CONFIG, or ./config.yaml if present) and apply the environment."""
    environ = dict(os.environ) if environ is None else environ
    path = Path(path or environ.get("CHATBOT_CONFIG") or "config.yaml")
    data: dict[str, Any] = {}
    if path.exists():
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    leaked = [name for name in SECRET_NAMES if name.lower() in {k.lower() for k in data}]
    if leaked:
        raise ConfigError(f"{path}: secrets belong in the environment, not the config file: {', '.join(leaked)}")
    try:
        return Settings.model_validate(_merge(data, _env_overrides(environ)))
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
