"""Queue overhead: message in, reply out, through Redis and a worker process, with an engine that answers at once."""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from bench.common import median, percentile, table
from contract.history import Exchange, load_exchanges
from contract.intake import Intake
from contract.jobs import Conversation
from contract.replies import follow, last_entry_id
from engine.assets import resolve_model
from engine.prompts import PromptBuilder
from engine.serving.engine import Engine
from engine.worker import Worker
from service.config import LimitSettings, Settings
from service.redis_client import connect
from service.redis_server import RedisServer

MESSAGES = 1000
CONVERSATIONS = 20


class InstantEngine(Engine):
    """Answers "ok" then ends the turn, without a model: what is left to measure is the queue, history and prompt path."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sequence_length = 4096
        self.batch_size = 1
        self.end_ids = frozenset({tokenizer.eos_token_id})
        [self.answer] = tokenizer("ok", add_special_tokens=False).input_ids

    def prefill(self, slot: int, prompt: list[int]) -> int:
        return self.answer

    def decode(self, slots: list[int]) -> list[int]:
        return [self.tokenizer.eos_token_id for _ in slots]

    def release(self, slot: int) -> None:
        pass


def serve(url: str, ready) -> None:
    """The worker, in its own process as in production, with the instant engine."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("embedded:llama2-tokenizer"))

    async def main() -> None:
        redis = connect(url)
        worker = Worker(redis, InstantEngine(tokenizer), Settings(), owner="bench")
        signal.signal(signal.SIGTERM, lambda *_: worker.stop())
        ready.set()
        await worker.run()
        await redis.aclose()

    asyncio.run(main())


async def measure(url: str) -> tuple[list[float], list[float], list[float]]:
    """PING round trips, message-to-reply latencies, and the worker's prompt work on the final histories."""
    redis = connect(url)
    queue = Intake(redis, LimitSettings())
    pings, latencies = [], []
    for n in range(MESSAGES):
        started = time.perf_counter()
        await redis.ping()
        pings.append(time.perf_counter() - started)
        conversation = Conversation(platform="bench", channel=f"c{n % CONVERSATIONS}")
        after = await last_entry_id(redis, "bench", conversation.key)
        started = time.perf_counter()
        submitted = await queue.submit(conversation, str(n), f"message number {n}")
        async for event in follow(redis, "bench", conversation.key, submitted.job_id, after):
            if event.kind == "final":
                latencies.append(time.perf_counter() - started)
    histories = [await load_exchanges(redis, f"bench:c{n}") for n in range(CONVERSATIONS)]
    await redis.aclose()
    return pings, latencies, prompt_work(histories)


def prompt_work(histories: list[list[Exchange]]) -> list[float]:
    """What the worker spends per message on prompt building and turn counting, without Redis."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("embedded:llama2-tokenizer"))
    settings = Settings()
    builder = PromptBuilder(tokenizer, settings.system_prompt, settings.model.max_prompt_tokens)
    times = []
    for history in histories * 5:
        started = time.perf_counter()
        prompt = builder.build(history, "message number 1000")
        builder.exchange_turns(prompt.user_content, "ok", None)
        times.append(time.perf_counter() - started)
    return times


def run() -> str:
    with tempfile.TemporaryDirectory() as data, RedisServer(Path(data)) as server:
        ready = multiprocessing.Event()
        worker = multiprocessing.Process(target=serve, args=(server.url, ready))
        worker.start()
        ready.wait(60)
        try:
            pings, latencies, prompts = asyncio.run(measure(server.url))
        finally:
            worker.terminate()
            worker.join(30)
    ping = median(pings)
    rows = [
        ["median", f"{median(latencies) * 1000:.2f} ms", f"{median(latencies) / ping:.1f}x"],
        ["p99", f"{percentile(latencies, 0.99) * 1000:.2f} ms", f"{percentile(latencies, 0.99) / ping:.1f}x"],
        ["of which prompt building + turn counting (median)", f"{median(prompts) * 1000:.2f} ms", f"{median(prompts) / ping:.1f}x"],
    ]
    return table(
        f"Queue overhead ({MESSAGES} messages, {CONVERSATIONS} conversations, instant engine; "
        f"baseline: Redis PING round trip, median {ping * 1000:.3f} ms)",
        ["", "message in -> reply out", "vs PING"],
        rows,
    )
