"""Prompt building with long histories: ours against re-render-and-re-tokenize after each dropped exchange."""

from __future__ import annotations

import random

from transformers import AutoTokenizer

from bench.common import best_of, table
from contract.history import Exchange
from engine.assets import resolve_model
from engine.prompts import PromptBuilder

BUDGET = 1536
SYSTEM = "You are a helpful, respectful and honest assistant."


def history_of(builder: PromptBuilder, exchanges: int) -> list[Exchange]:
    rng = random.Random(exchanges)
    words = "the a blue strawberry fruit colour model answer question Discord Slack because which".split()
    stored = []
    for _ in range(exchanges):
        user = " ".join(rng.choices(words, k=rng.randint(5, 40)))
        reply = " ".join(rng.choices(words, k=rng.randint(10, 80)))
        u, a = builder.exchange_turns(builder.user_content(user, None), reply, None)
        stored.append(Exchange(user=u, assistant=a))
    return stored


def reference(builder: PromptBuilder, history: list[Exchange], text: str) -> str:
    pairs = [(e.user.text, e.assistant.text) for e in history]
    content = builder.user_content(text, None)
    for dropped in range(len(pairs) + 1):
        rendered = builder.render(pairs[dropped:], content)
        if len(builder.encode(rendered)) <= builder.budget:
            return rendered
    raise AssertionError("does not fit")


def run() -> str:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("embedded:llama2-tokenizer"))
    builder = PromptBuilder(tokenizer, SYSTEM, BUDGET)
    rows = []
    for turns in (10, 100, 1000):
        history = history_of(builder, turns // 2)
        assert builder.build(history, "next?").text == reference(builder, history, "next?")
        repeats = 5 if turns < 1000 else 2
        ours = best_of(repeats * 4, lambda history=history: builder.build(history, "next?"))
        theirs = best_of(repeats, lambda history=history: reference(builder, history, "next?"))
        rows.append([str(turns), f"{theirs * 1000:.1f} ms", f"{ours * 1000:.2f} ms", f"**{theirs / ours:.0f}x**"])
    return table(
        f"Prompt building (Llama-2 tokenizer, budget {BUDGET} tokens)",
        ["turns of history", "reference: re-render + re-tokenize per drop", "ours", "speed-up"],
        rows,
    )
