"""What a decode step costs as the context grows: 4 streams at 50 and at 1,500 tokens of context.

Three caches on the same model in one run, greedy, the shipped dtype:
- concatenating (baseline): the engine's former `DynamicCache`, one column concatenated per step, so
  every step copies every row's whole cache (kept here, minimal, only to measure against);
- the engine's `SlotCache`: preallocated lines written in place, attention over a view;
- transformers' own `StaticCache` with its own `cache_position`: 4 rows of equal length.
Rounds alternate between the sides, so a slow spell of the machine hits every side alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import DynamicCache, StaticCache

from bench.common import median, table
from engine.serving.transformers_engine import TransformersEngine
from service.config import Settings

STREAMS = 4
CONTEXTS = [50, 1500]
STEPS = 5  # timed decode steps per round
ROUNDS = 3
TEXT = "The sea was calm that morning, and the fishermen talked about the storms of old. "


def prompts(engine: TransformersEngine, length: int) -> list[list[int]]:
    """STREAMS different prompts of `length` tokens each."""
    ids = engine.tokenizer(TEXT * (length // 8 + STREAMS)).input_ids
    return [ids[row : row + length] for row in range(STREAMS)]


def engine_side(engine: TransformersEngine, rows: list[list[int]]) -> Callable[[], None]:
    for slot, prompt in enumerate(rows):
        engine.prefill(slot, prompt)
    slots = list(range(STREAMS))
    return lambda: engine.decode(slots)


def concatenating_side(model, rows: list[list[int]]) -> Callable[[], None]:
    cache = DynamicCache(config=model.config)
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        last = model(input_ids=ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits.argmax(-1)
    state = {"last": last, "mask": mask}

    @torch.inference_mode()
    def step() -> None:
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["last"])], dim=1)
        positions = torch.full_like(state["last"], state["mask"].shape[1] - 1)
        output = model(
            input_ids=state["last"], attention_mask=state["mask"], position_ids=positions, past_key_values=cache
        )
        state["last"] = output.logits.argmax(-1)

    return step


def static_side(model, rows: list[list[int]], sequence_length: int) -> Callable[[], None]:
    cache = StaticCache(config=model.config, max_cache_len=sequence_length)
    ids = torch.tensor(rows)
    with torch.inference_mode():
        output = model(
            input_ids=ids, past_key_values=cache, cache_position=torch.arange(ids.shape[1]), logits_to_keep=1
        )
    state = {"last": output.logits.argmax(-1), "position": ids.shape[1]}

    @torch.inference_mode()
    def step() -> None:
        position = torch.tensor([state["position"]])
        output = model(input_ids=state["last"], past_key_values=cache, cache_position=position)
        state["last"], state["position"] = output.logits.argmax(-1), state["position"] + 1

    return step


def step_time(step: Callable[[], None]) -> float:
    started = time.perf_counter()
    for _ in range(STEPS):
        step()
    return (time.perf_counter() - started) / STEPS


def run(model_id: str = "embedded:smollm2") -> str:
    settings = Settings.model_validate(
        {"model": {"id": model_id, "device": "cpu", "batch_size": STREAMS}, "generation": {"do_sample": False}}
    )
    engine = TransformersEngine.load(settings.model, settings.generation)
    engine.end_ids = frozenset()
    names = ["concatenating DynamicCache (baseline)", "engine SlotCache", "transformers StaticCache"]
    times: dict[tuple[str, int], list[float]] = {}
    for length in CONTEXTS:
        rows = prompts(engine, length)
        sides = dict(zip(names, [
            concatenating_side(engine.model, rows),
            engine_side(engine, rows),
            static_side(engine.model, rows, engine.sequence_length),
        ]))
        for step in sides.values():
            step_time(step)  # warm-up: StaticCache's first few steps measured 2x slower than the next
        for _ in range(ROUNDS):
            for name, step in sides.items():
                times.setdefault((name, length), []).append(step_time(step))
    short, long = CONTEXTS
    step = {key: median(values) * 1000 for key, values in times.items()}
    baseline = step[(names[0], long)]
    table_rows = [
        [
            name, f"{step[(name, short)]:.1f}", f"{step[(name, long)]:.1f}",
            f"**{step[(name, long)] / step[(name, short)]:.2f}x**", f"{step[(name, long)] / baseline:.2f}x",
        ]
        for name in names
    ]
    return table(
        f"Decode step cost vs context ({model_id}, CPU, {engine.model.dtype}, {STREAMS} streams, "
        f"median of {ROUNDS} alternating rounds of {STEPS} steps)",
        ["cache", f"ms/step at {short}", f"ms/step at {long:,}", f"{long:,} / {short}", f"vs baseline at {long:,}"],
        table_rows,
    )
