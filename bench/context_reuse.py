"""Time to first token through a growing conversation, with the prefix cache and without.

One conversation, one question per turn, each prompt built by the worker's PromptBuilder from the
history so far (so the previous answer comes back re-tokenized, as in production). Both engines
share the loaded model in the shipped dtype; the conversation goes on with the cached engine's
answers, and the uncached engine answers the same prompts. In bfloat16 a suffix prefilled on a
cached prefix is not bitwise a full prefill, so the table reports how many answers agree.
"""

from __future__ import annotations

import time

from bench.common import table
from contract.history import Exchange, Turn
from engine.prompts import PromptBuilder
from engine.serving.transformers_engine import TransformersEngine
from service.config import Settings

NEW_TOKENS = 48
SHOWN_TURNS = [1, 2, 4, 6, 8, 10]
QUESTIONS = [
    "Hi! I am planning a trip to the sea. Where should I go?",
    "What should I pack for a week there?",
    "How do I keep my phone safe on the beach?",
    "Which fish can I expect to see when snorkelling?",
    "Is it safe to swim in the evening?",
    "Suggest a simple dinner I can cook at a campsite.",
    "How do I read a tide table?",
    "What is the best time of day for photographs?",
    "Give me three ideas for a rainy day.",
    "Summarise the plan we made, in a few lines.",
]


def answer(engine: TransformersEngine, prompt: list[int]) -> tuple[float, list[int]]:
    """Seconds to the first token, and the whole answer (end-of-turn token excluded)."""
    started = time.perf_counter()
    token = engine.prefill(0, prompt)
    first = time.perf_counter() - started
    tokens = []
    while token not in engine.end_ids and len(tokens) < NEW_TOKENS:
        tokens.append(token)
        [token] = engine.decode([0])
    engine.release(0)
    return first, tokens


def run(model_id: str = "embedded:smollm2") -> str:
    settings = Settings.model_validate({"model": {"id": model_id, "device": "cpu"}, "generation": {"do_sample": False}})
    cached = TransformersEngine.load(settings.model, settings.generation)
    model = settings.model
    uncached = TransformersEngine(cached.model, cached.tokenizer, model.sequence_length, model.batch_size, settings.generation)
    builder = PromptBuilder(cached.tokenizer, settings.system_prompt, model.max_prompt_tokens)
    answer(uncached, builder.build([], "Hello").ids)  # warm-up, outside the cache
    history: list[Exchange] = []
    rows, agreed = [], 0
    for turn, question in enumerate(QUESTIONS, start=1):
        prompt = builder.build(history, question).ids
        with_cache, tokens = answer(cached, prompt)
        reused = cached.cached_tokens(0)
        without_cache, reference = answer(uncached, prompt)
        agreed += tokens == reference
        if turn in SHOWN_TURNS:
            rows.append([
                str(turn), str(len(prompt)), str(reused), f"{without_cache:.2f}", f"{with_cache:.2f}",
                f"**{with_cache / without_cache:.2f}x**",
            ])
        text = cached.tokenizer.decode(tokens, skip_special_tokens=True)
        history.append(Exchange(
            user=Turn(role="user", text=question, tokens=builder.count(question)),
            assistant=Turn(role="assistant", text=text, tokens=builder.count(text)),
        ))
    return table(
        f"Time to first token in a growing conversation ({model_id}, CPU, {cached.model.dtype}, greedy, "
        f"{NEW_TOKENS} new tokens a turn; answers equal with and without the cache: {agreed} of {len(QUESTIONS)})",
        ["turn", "prompt tokens", "cached tokens", "no cache (s)", "prefix cache (s)", "cache / no cache"],
        rows,
    )
