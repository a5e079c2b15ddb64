"""`chatbot doctor`: pre-flight checks an operator runs before going live.

One line per check, `ok`, `FAIL` (with what to fix) or `skipped` (with why), and a non-zero exit
status when any check fails. Redis and the model are checked here; each platform checks itself
(bot/slack/doctor.py, bot/discord/doctor.py), only when its token is set.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TextIO
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from service.config import ConfigError, GenerationSettings, ModelSettings, Secrets, Settings
from service.runtime import log_to_file, redis_url, startup

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from engine.serving.openai_engine import OpenAIEngine

APP_CONFIG_TOKEN = "SLACK_APP_CONFIG_TOKEN"  # read by bot/slack/doctor.py only
# A server or platform that has not answered by then is reported, and the other checks still run.
GROUP_TIMEOUT_S = 60.0
REDIS_TIMEOUT_S = 5.0
# The least model.max_prompt_tokens the settings accept: a fix never suggests less.
MIN_PROMPT_TOKENS = ModelSettings.model_fields["max_prompt_tokens"].metadata[0].ge

Status = Literal["ok", "FAIL", "skipped"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str  # what was found
    fix: str = ""  # for a FAIL: what to change, and where

    def line(self) -> str:
        return f"{self.status:<8} {self.name}: {self.detail}" + (f". Fix: {self.fix}" if self.fix else "")


def ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, "FAIL", detail, fix)


def skipped(name: str, detail: str) -> Check:
    return Check(name, "skipped", detail)


# --- Redis ----------------------------------------------------------------------------------


def _where(url: str) -> str:
    """The server's address without the credentials a URL may carry."""
    parts = urlsplit(url)
    return parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"


async def redis_checks(url: str) -> list[Check]:
    client = Redis.from_url(url, decode_responses=True, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S)
    try:
        try:
            await client.ping()
        except RedisError as error:
            return [fail("redis", f"cannot reach {_where(url)} ({error})", "start it, or set REDIS_URL to the server the worker uses")]
        reachable = ok("redis", f"reachable at {_where(url)}")
        try:
            policy = (await client.config_get("maxmemory-policy"))["maxmemory-policy"]
            appendonly = (await client.config_get("appendonly"))["appendonly"]
            save = (await client.config_get("save"))["save"]
        except ResponseError as error:  # CONFIG renamed away, refused by an ACL, or a managed service's
            return [
                reachable,
                skipped("redis memory", f"could not be checked: CONFIG GET refused ({error}); make sure maxmemory-policy is noeviction"),
                skipped("redis persistence", f"could not be checked: CONFIG GET refused ({error}); make sure appendonly is yes"),
            ]
        return [reachable, _memory(policy), _persistence(appendonly, save)]
    finally:
        await client.aclose()


def _memory(policy: str) -> Check:
    if policy == "noeviction":
        return ok("redis memory", "maxmemory-policy is noeviction (a full Redis refuses writes, people are asked to try again)")
    return fail(
        "redis memory",
        f"maxmemory-policy is {policy}: a full Redis may silently evict queued jobs and histories",
        "CONFIG SET maxmemory-policy noeviction, and in redis.conf: maxmemory-policy noeviction",
    )


def _persistence(appendonly: str, save: str) -> Check:
    if appendonly == "yes":
        return ok("redis persistence", "appendonly yes")
    if save.strip():
        return ok("redis persistence", f"snapshots only (save {save}): a crash loses what was written since the last one")
    return fail(
        "redis persistence",
        'off (appendonly no, save ""): a Redis restart loses queued messages, leases and histories',
        "CONFIG SET appendonly yes, then CONFIG REWRITE (or in redis.conf: appendonly yes, appendfsync everysec)",
    )


# --- the model ------------------------------------------------------------------------------


def budget_check(model: ModelSettings, generation: GenerationSettings) -> Check:
    need = model.max_prompt_tokens + generation.max_new_tokens
    if need <= model.sequence_length:
        return ok(
            "model budget",
            f"max_prompt_tokens {model.max_prompt_tokens} + max_new_tokens {generation.max_new_tokens} = {need} "
            f"fit sequence_length {model.sequence_length}",
        )
    room = model.sequence_length - model.max_prompt_tokens
    fixes = [f"lower generation.max_new_tokens to {room}"]
    if model.sequence_length - generation.max_new_tokens >= MIN_PROMPT_TOKENS:
        fixes.append(f"model.max_prompt_tokens to {model.sequence_length - generation.max_new_tokens}")
    return fail(
        "model budget",
        f"model.max_prompt_tokens {model.max_prompt_tokens} + generation.max_new_tokens {generation.max_new_tokens} = {need} "
        f"exceed model.sequence_length {model.sequence_length}: after a full prompt an answer stops at {room} tokens",
        " or ".join(fixes) + " (or raise model.sequence_length, where the model allows)",
    )


def model_checks(settings: Settings, api_key: str | None) -> list[Check]:
    """The budget, the model id (and its server with backend openai), the system prompts against the budget."""
    checks = [budget_check(settings.model, settings.generation)]
    model_id = settings.model.id
    folder = Path(model_id).expanduser()
    if not folder.exists() and (folder.is_absolute() or model_id.startswith((".", "~"))):
        return [*checks, fail("model", f"model.id {model_id}: no such folder", "set model.id to the folder holding the model")]
    try:
        tokenizer, server = _load(settings, api_key)
    except Exception as error:  # an unknown embedded id, a Hub id not found, a folder without a tokenizer...
        return [
            *checks,
            fail(
                "model", f"model.id {model_id} does not load: {type(error).__name__}: {error}",
                "set model.id to embedded:smollm2, a folder with the model (its tokenizer, for backend openai) or a Hub id",
            ),
        ]
    checks += [ok("model", f"{model_id} loads (backend {settings.model.backend})"), prompt_room_check(settings, tokenizer)]
    if server is not None:
        checks.append(_server_check(settings, server))
    return checks


def _load(settings: Settings, api_key: str | None) -> tuple[PreTrainedTokenizerBase, OpenAIEngine | None]:
    """The tokenizer the worker builds prompts with, and with backend openai the engine that asks the server."""
    # Imported here: transformers takes seconds to import, which the Redis and platform checks do not need.
    from transformers import AutoTokenizer

    from engine.assets import resolve_model

    if settings.model.backend == "openai":
        from engine.serving.openai_engine import OpenAIEngine

        engine = OpenAIEngine.load(settings, api_key)
        return engine.tokenizer, engine
    return AutoTokenizer.from_pretrained(resolve_model(settings.model.id)), None


def _server_check(settings: Settings, engine: OpenAIEngine) -> Check:
    try:
        problem = engine.health()  # the worker's own question: served model listed, max_model_len >= sequence_length
    finally:
        engine.client.close()
    if problem is None:
        return ok("model server", f"{settings.openai.base_url} serves {engine.served_model}")
    return fail(
        "model server", problem,
        "start the server with the model and --max-model-len of at least model.sequence_length, "
        "or set openai.base_url and openai.served_model to what it serves",
    )


def prompt_room_check(settings: Settings, tokenizer: PreTrainedTokenizerBase) -> Check:
    """Each system prompt (the global one, each persona of config.yaml) leaves room in the prompt budget for a message."""
    from engine.prompts import PromptBuilder, PromptTooSmall

    budget = settings.model.max_prompt_tokens
    prompts = {"system_prompt": settings.system_prompt}
    for persona in settings.personas:
        where = " ".join(f"{key} {getattr(persona, key)}" for key in ("workspace", "channel") if getattr(persona, key))
        prompts[f"persona ({persona.platform} {where})"] = persona.system_prompt
    sizes, too_long = {}, []
    builder = None
    for name, text in prompts.items():
        try:
            # The first builder that fits learns the tokenizer; the others share what it learnt.
            builder = builder.with_system_prompt(text) if builder else PromptBuilder(tokenizer, text, budget)
        except PromptTooSmall as error:
            too_long.append(f"{name}: {error}")
            continue
        sizes[name] = builder.count(builder.render([], ""))
    if too_long:
        return fail("system prompts", "; ".join(too_long), "shorten them, or raise model.max_prompt_tokens")
    largest = max(sizes, key=sizes.get)
    return ok(
        "system prompts",
        f"system_prompt and {len(sizes) - 1} persona(s) leave room for a message in max_prompt_tokens {budget}; "
        f"the largest, {largest}, takes {sizes[largest]} tokens with the chat template",
    )


# --- running them ---------------------------------------------------------------------------


async def _within(what: str, checks: Awaitable[list[Check]]) -> list[Check]:
    try:
        return await asyncio.wait_for(checks, GROUP_TIMEOUT_S)
    except TimeoutError:
        # Our limit, or a client's own shorter one.
        return [fail(what, "no answer in time", f"check that this machine can reach {what}")]


async def diagnose(
    settings: Settings, secrets: Secrets, redis_at: str | None, out: TextIO = sys.stdout, slack_api_url: str | None = None
) -> int:
    """Run every check, print one line each as they come; 1 if any failed, else 0.

    `redis_at`: None when there is no Redis to check (the embedded one is started by the service itself).
    `slack_api_url`: Slack's Web API unless given (tests point it at a fake).
    """
    results: list[Check] = []

    def show(checks: list[Check]) -> None:
        for check in checks:
            print(check.line(), file=out, flush=True)
        results.extend(checks)

    if redis_at is None:
        show([skipped("redis", "no REDIS_URL set and no embedded redis-server running: `chatbot run` starts its own")])
    else:
        show(await _within("redis", redis_checks(redis_at)))
    # In a thread: loading a tokenizer takes seconds, and the model server's health is a blocking call.
    show(await asyncio.to_thread(model_checks, settings, secrets.get("OPENAI_API_KEY")))
    if secrets.get("SLACK_BOT_TOKEN"):
        from bot.slack.doctor import slack_checks

        show(await _within("slack", slack_checks(settings, secrets, slack_api_url)))
    elif secrets.get("SLACK_CLIENT_ID"):  # one app installed in many workspaces
        from bot.slack.doctor import workspace_checks

        show(await _within("slack", workspace_checks(settings, secrets, redis_at, slack_api_url)))
    else:
        show([skipped("slack", "neither SLACK_BOT_TOKEN nor SLACK_CLIENT_ID is set")])
    if secrets.get("DISCORD_TOKEN"):
        from bot.discord.doctor import discord_checks

        show(await _within("discord", discord_checks(settings.discord, secrets.get("DISCORD_TOKEN"))))
    else:
        show([skipped("discord", "DISCORD_TOKEN is not set")])

    failed = sum(check.status == "FAIL" for check in results)
    print(f"{failed} of {len(results)} checks failed" if failed else f"all {len(results)} checks passed or skipped", file=out)
    return 1 if failed else 0


def doctor_command(args: argparse.Namespace) -> int:
    settings, secrets = startup(args.config)
    # The terminal gets one line per check; the libraries' logs go to the file, with every token masked.
    log_to_file(settings, secrets)
    try:
        url, _ = redis_url(settings, start_embedded=False)
    except ConfigError:
        url = None
    return asyncio.run(diagnose(settings, secrets, url))
