"""Worker generation speed against calling model.generate directly on the same model and settings."""

from __future__ import annotations

import asyncio
import time

import torch
from engine.backends.transformers_backend import TransformersBackend

from bench.common import median, table
from engine.config import Settings
from engine.jobs import Job
from engine.prompts import Prompt, PromptBuilder
from engine.redis_client import connect
from engine.worker import Task, Worker

NEW_TOKENS = 96
ROUNDS = 5


def direct(backend: TransformersBackend, ids: list[int]) -> float:
    """tokens/s of plain model.generate, greedy, no hook."""
    input_ids = torch.tensor([ids])
    started = time.perf_counter()
    with torch.inference_mode():
        output = backend.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=backend.pad_id,
        )
    return (output.shape[1] - len(ids)) / (time.perf_counter() - started)


def through_worker(backend: TransformersBackend, worker: Worker, ids: list[int]) -> float:
    """tokens/s of the worker's generation path: per-step hook, streaming decode, partial events queued."""
    job = Job(id="bench:1", conversation="bench:c", platform="bench", text="x")
    task = Task(job, Prompt("", ids, "x", 0, 0))

    async def go() -> float:
        hook = worker._on_step_from([task])
        started = time.perf_counter()
        settings = worker.settings.generation.model_copy(update={"max_new_tokens": NEW_TOKENS})
        rows = await asyncio.to_thread(backend.generate, [ids], settings, hook)
        if len(rows[0]) != NEW_TOKENS:
            raise RuntimeError(f"the model stopped after {len(rows[0])} tokens: pick a prompt with a longer answer")
        return len(rows[0]) / (time.perf_counter() - started)

    return asyncio.run(go())


def run(model_id: str = "embedded:smollm2") -> str:
    settings = Settings.model_validate({"model": {"id": model_id, "device": "cpu"}, "queue": {"partial_interval_s": 0.25}})
    backend = TransformersBackend.load(settings.model)
    # The measured path never reaches Redis (partials wait in the worker's in-process queue).
    worker = Worker(connect("redis://127.0.0.1:1"), backend, settings, owner="bench")
    builder = PromptBuilder(backend.tokenizer, settings.system_prompt, 512)
    ids = builder.build([], "Write a long story about the sea, with many details.").ids
    direct(backend, ids)  # warm-up
    plain, ours = [], []
    for _ in range(ROUNDS):  # alternated, so a slow spell of the machine hits both sides alike
        plain.append(direct(backend, ids))
        ours.append(through_worker(backend, worker, ids))
    ratio = median([o / p for o, p in zip(ours, plain)])
    return table(
        f"Generation speed ({model_id}, CPU, greedy, {NEW_TOKENS} new tokens, {ROUNDS} alternating rounds)",
        ["model.generate directly (median)", "worker path (median)", "ratio (median of rounds)"],
        [[f"{median(plain):.1f} tokens/s", f"{median(ours):.1f} tokens/s", f"**{ratio:.2f}**"]],
    )
