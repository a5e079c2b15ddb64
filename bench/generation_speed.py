"""One conversation's decoding speed: the serving engine (default weights, and float32) against fp32 model.generate.

model.generate in float32 is how the worker generated before continuous batching: the baseline.
The engine rows run the scheduler's prefill and decode steps for one slot, as the worker does.
Rounds alternate, so a slow spell of the machine hits every side alike.
"""

from __future__ import annotations

import time

import torch

from bench.common import median, table
from engine.prompts import PromptBuilder
from engine.serving.scheduler import Scheduler
from engine.serving.transformers_engine import TransformersEngine
from service.config import Settings

NEW_TOKENS = 96
ROUNDS = 3
PROMPT = "Write a long story about the sea, with many details."
default_threads = torch.get_num_threads()


def generate_fp32(engine: TransformersEngine, ids: list[int]) -> float:
    """tokens/s of plain model.generate, greedy."""
    input_ids = torch.tensor([ids])
    started = time.perf_counter()
    with torch.inference_mode():
        output = engine.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=engine.tokenizer.eos_token_id,
        )
    return (output.shape[1] - len(ids)) / (time.perf_counter() - started)


def serving(engine: TransformersEngine, ids: list[int], threads: int) -> float:
    """tokens/s of one slot through the scheduler."""
    torch.set_num_threads(threads)
    try:
        scheduler = Scheduler(engine, NEW_TOKENS)
        started = time.perf_counter()
        scheduler.admit(ids, None)
        while scheduler.live:
            scheduler.step()
        return NEW_TOKENS / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(default_threads)



def run(model_id: str = "embedded:smollm2") -> str:
    settings = Settings.model_validate({"model": {"id": model_id, "device": "cpu"}, "generation": {"do_sample": False}})
    fp32_settings = settings.model.model_copy(update={"dtype": "float32"})
    fp32 = TransformersEngine.load(fp32_settings, settings.generation)
    default = TransformersEngine.load(settings.model, settings.generation)  # the embedded default's dtype
    ids = PromptBuilder(fp32.tokenizer, settings.system_prompt, 512).build([], PROMPT).ids
    fp32.end_ids = default.end_ids = frozenset()  # every engine run decodes NEW_TOKENS, as min_new_tokens does
    generate_fp32(fp32, ids)  # warm-up
    sides = {
        "model.generate, float32 (baseline)": lambda: generate_fp32(fp32, ids),
        "engine, float32": lambda: serving(fp32, ids, default_threads),
        f"engine, {default.model.dtype} (default), {default_threads} threads": lambda: serving(default, ids, default_threads),
        f"engine, {default.model.dtype} (default), 1 thread": lambda: serving(default, ids, 1),
    }
    speeds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(ROUNDS):
        for name, side in sides.items():
            speeds[name].append(side())
    baseline = speeds["model.generate, float32 (baseline)"]
    rows = [
        [name, f"{median(values):.1f}", f"**{median([v / b for v, b in zip(values, baseline)]):.2f}x**"]
        for name, values in speeds.items()
    ]
    return table(
        f"Single-conversation speed ({model_id}, CPU, greedy, {NEW_TOKENS} new tokens, {ROUNDS} alternating rounds)",
        ["path", "tokens/s (median)", "vs baseline (median of rounds)"],
        rows,
    )
