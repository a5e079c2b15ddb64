"""Queue overhead: message in, reply out, through Redis and the worker, with a backend that answers at once."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer

from bench.common import median, percentile, table
from engine.assets import resolve_model
from engine.backends.base import Backend
from engine.config import GenerationSettings, Settings
from engine.generation import StepCallback
from engine.jobs import Conversation
from engine.queue import JobQueue
from engine.redis_client import connect
from engine.redis_server import RedisServer
from engine.replies import follow, last_entry_id
from engine.worker import Worker

MESSAGES = 1000
CONVERSATIONS = 20


class InstantBackend(Backend):
    """Answers "ok" without a model: what is left to measure is the queue, history and prompt path."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sequence_length = 4096
        self.batch_size = 1
        self.end_ids = frozenset({tokenizer.eos_token_id})
        self.answer = tokenizer("ok", add_special_tokens=False).input_ids

    def generate(self, prompts: Sequence[Sequence[int]], settings: GenerationSettings, on_step: StepCallback):
        on_step([self.answer for _ in prompts])
        return [list(self.answer) for _ in prompts]


async def measure(url: str, backend: Backend) -> tuple[list[float], list[float]]:
    redis = connect(url)
    settings = Settings()
    worker = Worker(redis, backend, settings, owner="bench")
    serving = asyncio.create_task(worker.run())
    queue = JobQueue(redis)
    pings, latencies = [], []
    for n in range(MESSAGES):
        started = time.perf_counter()
        await redis.ping()
        pings.append(time.perf_counter() - started)
        conversation = Conversation(platform="bench", channel=f"c{n % CONVERSATIONS}")
        after = await last_entry_id(redis, "bench")
        started = time.perf_counter()
        submitted = await queue.submit(conversation, str(n), f"message number {n}")
        async for event in follow(redis, "bench", submitted.job_id, after):
            if event.kind == "final":
                latencies.append(time.perf_counter() - started)
    worker.stop()
    await serving
    await redis.aclose()
    return pings, latencies


def run() -> str:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("embedded:llama2-tokenizer"))
    with tempfile.TemporaryDirectory() as data, RedisServer(Path(data)) as server:
        pings, latencies = asyncio.run(measure(server.url, InstantBackend(tokenizer)))
    ping = median(pings)
    rows = [
        ["median", f"{median(latencies) * 1000:.2f} ms", f"{median(latencies) / ping:.1f}x"],
        ["p99", f"{percentile(latencies, 0.99) * 1000:.2f} ms", f"{percentile(latencies, 0.99) / ping:.1f}x"],
    ]
    return table(
        f"Queue overhead ({MESSAGES} messages, {CONVERSATIONS} conversations, instant backend; "
        f"baseline: Redis PING round trip, median {ping * 1000:.3f} ms)",
        ["", "message in -> reply out", "vs PING"],
        rows,
    )
