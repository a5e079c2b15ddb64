"""The model's checks for `chatbot doctor`: the token budget, the model id (and its server with backend
openai), and the system prompts against the budget."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from service.config import GenerationSettings, ModelSettings, Settings
from service.doctor import Check, fail, ok

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from engine.serving.openai_engine import OpenAIEngine

# The least model.max_prompt_tokens the settings accept: a fix never suggests less.
MIN_PROMPT_TOKENS = ModelSettings.model_fields["max_prompt_tokens"].metadata[0].ge


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
