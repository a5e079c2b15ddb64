"""Many conversations at once: continuous batching against whole-batch admission and batch 1, in one run.

32 messages over 16 conversations (two each, so a conversation's second message waits for its
first), answers of mixed lengths, submitted all together and also arriving at random
intervals. The worker serves them through real Redis; its per-job log line gives time to first
token and time to final reply, both measured from submission.

Besides the real models on the CPU, a Neuron-shaped engine: on Inferentia2 the compiled decode
graph always runs the whole batch, so a step costs the same however many slots are live, and a
prefill costs the same whatever the prompt (it is padded to the compiled length). On the CPU a
step costs more with more rows, which hides part of what whole-batch admission wastes. Its
timings are assumptions (see NEURON_SHAPED), not measurements on Inferentia.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path

from bench.common import percentile, table, worker_running
from contract.intake import Intake
from contract.jobs import Conversation
from engine.serving.engine import MODEL_THREAD, Engine
from engine.serving.transformers_engine import TransformersEngine
from service.config import Settings
from service.redis_server import RedisServer

CONVERSATIONS = 16
MESSAGES = 32
MEAN_GAP_S = 0.15  # random arrivals: exponential gaps with this mean
QUESTIONS = [
    "Hi!", "Write a short poem about the sea.", "What is the capital of France?", "Explain how a rainbow forms.",
    "Say yes or no: is water wet?", "List five fruits.", "Tell me a story about a brave cat.", "What is 2 + 2?",
    "Describe your favourite season and why.", "Thanks!", "How do airplanes fly?", "Name a colour.",
    "Give me three tips for learning to cook.", "Who wrote Hamlet?", "Write a haiku about autumn.", "Good night!",
]
NEURON_SHAPED = "neuron-shaped (simulated: 30 ms decode step, 120 ms prefill)"
MODELS = {
    # The tiny random Llama rarely ends a turn on its own: a context just above the longest
    # prompts gives each message its own limit (from about 20 to 256 tokens).
    "embedded:tiny-llama": {"model": {"sequence_length": 500, "max_prompt_tokens": 480, "dtype": "float32"},
                            "generation": {"max_new_tokens": 256, "repetition_penalty": 1.0}},
    # SmolLM2 as the embedded default serves it (bfloat16, repetition penalty 1.2, 256 new
    # tokens at most), greedy so that every policy writes the same answers.
    "embedded:smollm2": {"model": {"sequence_length": 2048, "max_prompt_tokens": 1024},
                         "generation": {"max_new_tokens": 128, "do_sample": False, "repetition_penalty": 1.2}},
    NEURON_SHAPED: {"model": {"id": "embedded:tiny-llama", "sequence_length": 4096, "max_prompt_tokens": 1024},
                    "generation": {"max_new_tokens": 512}},
}


ANSWER_LENGTHS = (4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # tokens, one drawn per prompt


class FixedCostEngine(Engine):
    """Inferentia2's cost shape on a clock: fixed decode-step and prefill times, answers of set lengths."""

    def __init__(self, tokenizer, batch_size: int, step_s: float = 0.030, prefill_s: float = 0.120):
        self.tokenizer = tokenizer
        self.sequence_length = 4096
        self.batch_size = batch_size
        self.end_ids = frozenset({tokenizer.eos_token_id})
        [self.word] = tokenizer("ok", add_special_tokens=False).input_ids
        self.step_s, self.prefill_s = step_s, prefill_s
        self.remaining: dict[int, int] = {}

    def prefill(self, slot: int, prompt: list[int]) -> int:
        time.sleep(self.prefill_s)
        self.remaining[slot] = random.Random(hash(tuple(prompt))).choice(ANSWER_LENGTHS)  # the same for every policy
        return self._next(slot)

    def decode(self, slots: list[int]) -> list[int]:
        time.sleep(self.step_s)
        return [self._next(slot) for slot in slots]

    def release(self, slot: int) -> None:
        self.remaining.pop(slot, None)

    def _next(self, slot: int) -> int:
        self.remaining[slot] -= 1
        return self.word if self.remaining[slot] >= 0 else self.tokenizer.eos_token_id


def messages(model_id: str) -> list[tuple[Conversation, str]]:
    rng = random.Random(7)
    out = []
    for n in range(MESSAGES):
        text = QUESTIONS[n % len(QUESTIONS)]
        if model_id == "embedded:tiny-llama":
            text += " more" * rng.randrange(0, 420)  # prompt length decides the answer length here
        out.append((Conversation(platform="bench", channel=f"c{n % CONVERSATIONS}"), text))
    return out


async def serve_once(url: str, engine: TransformersEngine, settings: Settings, arrivals: str, model_id: str) -> dict:
    rng = random.Random(11)
    async with worker_running(url, engine, settings) as run:
        queue = Intake(run.redis, settings.limits)
        started = time.time()
        for n, (conversation, text) in enumerate(messages(model_id)):
            await queue.submit(conversation, str(n), text)
            if arrivals == "random":
                await asyncio.sleep(rng.expovariate(1 / MEAN_GAP_S))
        records = await run.answered(MESSAGES)
    finished = max(r.created for r in records)
    return {
        "ttft": [r.ttft_s for r in records],
        "final": [r.total_s for r in records],
        "tokens_per_s": sum(r.new_tokens for r in records) / (finished - started),
    }


def run(model_ids: list[str] | None = None) -> str:
    tables = []
    with tempfile.TemporaryDirectory() as data, RedisServer(Path(data)) as server:
        for model_id in model_ids or list(MODELS):
            overrides = MODELS[model_id]
            base = Settings.model_validate(
                {"model": {"id": model_id, "device": "cpu", **overrides["model"]}, "generation": overrides["generation"],
                 "queue": {"partial_interval_s": 0.25}}
            )
            loaded = MODEL_THREAD.submit(TransformersEngine.load, base.model, base.generation).result()

            cases = [("batch 1", 1, "continuous")]
            for batch in (4, 8):
                cases += [(f"batch {batch}, whole-batch admission", batch, "whole_batch"), (f"batch {batch}, continuous", batch, "continuous")]
            for arrivals in ("together", "random"):
                results = {}
                for label, batch, admission in cases:
                    settings = base.model_copy(update={"model": base.model.model_copy(update={"batch_size": batch, "admission": admission})})
                    engine = make_engine(model_id, loaded, settings)
                    results[label] = asyncio.run(serve_once(server.url, engine, settings, arrivals, model_id))
                    print(f"  {model_id} {arrivals} {label}: done", flush=True)
                tables.append(render(model_id, arrivals, results))
    return "\n\n".join(tables)


def make_engine(model_id: str, loaded: TransformersEngine, settings: Settings) -> Engine:
    """A fresh engine with the settings' slots, around the model loaded once."""
    if model_id == NEURON_SHAPED:
        return FixedCostEngine(loaded.tokenizer, settings.model.batch_size)
    model = settings.model
    return TransformersEngine(loaded.model, loaded.tokenizer, model.sequence_length, model.batch_size, settings.generation)


def render(model_id: str, arrivals: str, results: dict[str, dict]) -> str:
    one = results["batch 1"]["tokens_per_s"]
    rows = []
    for label, r in results.items():
        batch = label.split(",")[0]
        whole = results.get(f"{batch}, whole-batch admission")
        vs_whole = ""
        if whole and "continuous" in label:
            vs_whole = (f"p95 final {percentile(whole['final'], 0.95) / percentile(r['final'], 0.95):.2f}x better, "
                        f"tokens/s {r['tokens_per_s'] / whole['tokens_per_s']:.2f}x")
        rows.append([
            label,
            f"{percentile(r['ttft'], 0.5):.2f} / {percentile(r['ttft'], 0.95):.2f} s",
            f"{percentile(r['final'], 0.5):.2f} / {percentile(r['final'], 0.95):.2f} s",
            f"{r['tokens_per_s']:.1f}",
            f"{r['tokens_per_s'] / one:.2f}x",
            vs_whole,
        ])
    how = "all submitted together" if arrivals == "together" else f"random arrivals, mean gap {MEAN_GAP_S} s"
    return table(
        f"Concurrency ({model_id}{'' if model_id == NEURON_SHAPED else ', CPU'}, {MESSAGES} messages over "
        f"{CONVERSATIONS} conversations, {how})",
        ["serving", "time to first token p50 / p95", "time to final p50 / p95", "tokens/s (all)", "vs batch 1",
         "continuous vs whole-batch"],
        rows,
    )
