"""Beside a proven server: our engine and our worker against vLLM's CPU build, same SmolLM2 folder, one run.

vLLM runs with its default settings (it computes on one core and keeps the other for its API
server), started once and idle while our side runs; each side is timed alone, since vLLM's
threads keep a core busy for a moment after each request. vLLM's prefix cache is emptied
before each of its series, so no side inherits the other's work.

1. Tokens/s at 1, 4 and 8 streams: our engine called directly (prefill + decode, no Redis)
   against concurrent requests to vLLM, 128 new tokens each, end of turn ignored.
2. The cost of the queue on top of a server: 4 conversations at once through Redis and the
   worker, over our engine and over `model.backend: openai` -> vLLM, against the same prompt
   ids sent to vLLM directly; median time to the final reply.
3. Follow-ups: time to first token through turn 30 of one conversation through the worker
   (shipped settings, answers capped at 64 tokens to keep the run short), without and with the
   prefix cache and with low-water truncation, against vLLM on the same prompts in the same order.
4. kill -9 of the server mid-answer and a restart: the worker over `openai` answers each job once.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import progress, table, worker_running
from bench.vllm_server import VllmServer
from contract import keys
from contract.history import load_exchanges
from contract.intake import Intake
from contract.jobs import Conversation, ReplyEvent
from contract.replies import REPLY_SHARDS
from engine.assets import resolve_model
from engine.prompts import PromptBuilder
from engine.serving.engine import MODEL_THREAD, Engine
from engine.serving.openai_engine import OpenAIEngine
from engine.serving.transformers_engine import TransformersEngine
from service.config import Settings, load_settings
from service.redis_server import RedisServer

MODEL_ID = "embedded:smollm2"
SERVED = "smollm2"
NEW_TOKENS = 128
STREAMS = (1, 4, 8)
FOLLOW_UP_TOKENS = 64
SHOWN_TURNS = (1, 2, 5, 10, 15, 20, 22, 25, 28, 30)
QUESTIONS = [
    "Hi! I am planning a trip to the sea. Where should I go?", "What should I pack for a week there?",
    "How do I keep my phone safe on the beach?", "Which fish can I expect to see when snorkelling?",
    "Is it safe to swim in the evening?", "Suggest a simple dinner I can cook at a campsite.",
    "How do I read a tide table?", "What is the best time of day for photographs?",
    "Give me three ideas for a rainy day.", "How much money should I budget per day?",
    "What local food should I try?", "How do I avoid sunburn?", "Can you suggest a short hike nearby?",
    "What is a good book to read on the beach?", "How do I get there by train?", "Should I rent a bike?",
    "What games can we play on the sand?", "Is the water cold in June?", "What do I do if a jellyfish stings me?",
    "Where can I watch the sunset?", "How early should I book a campsite?", "What souvenirs are worth buying?",
    "How do I clean sand out of a tent?", "Which apps help with tides and weather?", "Is it OK to light a fire on the beach?",
    "How do I make coffee without electricity?", "What birds might I see?", "How do I pack the car efficiently?",
    "What should I do on the last evening?", "Summarise the plan we made, in a few lines.",
]


def shipped_settings(**model) -> Settings:
    """config.yaml as shipped, on the CPU, greedy (both sides write the same answers), answers capped."""
    shipped = load_settings(Path(__file__).resolve().parent.parent / "config.yaml", environ={})
    return shipped.model_copy(update={
        "model": shipped.model.model_copy(update={"id": MODEL_ID, "device": "cpu", **model}),
        "generation": shipped.generation.model_copy(update={"do_sample": False, "max_new_tokens": FOLLOW_UP_TOKENS}),
        "queue": shipped.queue.model_copy(update={"partial_interval_s": 0.25}),
    })


def served_settings(settings: Settings, vllm: VllmServer) -> Settings:
    """The same settings with vLLM as the engine (model.backend: openai)."""
    return settings.model_copy(update={
        "model": settings.model.model_copy(update={"backend": "openai"}),
        "openai": settings.openai.model_copy(update={"base_url": vllm.base_url, "served_model": SERVED}),
    })


# --- 1. tokens/s ----------------------------------------------------------------------------


def engine_tokens_per_s(engine: TransformersEngine, prompts: list[list[int]]) -> float:
    started = time.perf_counter()
    for slot, prompt in enumerate(prompts):
        engine.prefill(slot, prompt)
    slots = list(range(len(prompts)))
    for _ in range(NEW_TOKENS - 1):
        engine.decode(slots)
    elapsed = time.perf_counter() - started
    for slot in slots:
        engine.release(slot)
    return len(prompts) * NEW_TOKENS / elapsed


def vllm_tokens_per_s(vllm: VllmServer, prompts: list[list[int]]) -> float:
    def complete(prompt: list[int]) -> int:
        body = {"model": SERVED, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
        return httpx.post(f"{vllm.base_url}/completions", json=body, timeout=300).json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        tokens = sum(pool.map(complete, prompts))
    return tokens / (time.perf_counter() - started)


def throughput(engine: TransformersEngine, builder: PromptBuilder, vllm: VllmServer) -> str:
    prompts = [builder.build([], question).ids for question in QUESTIONS[: max(STREAMS)]]
    engine_tokens_per_s(engine, prompts[:2])  # warm-up, untimed
    ours = {streams: engine_tokens_per_s(engine, prompts[:streams]) for streams in STREAMS}
    vllm.reset_prefix_cache()
    vllm_tokens_per_s(vllm, prompts[:2])
    theirs = {streams: vllm_tokens_per_s(vllm, prompts[:streams]) for streams in STREAMS}
    rows = [[str(n), f"{ours[n]:.1f}", f"{theirs[n]:.1f}", f"**{ours[n] / theirs[n]:.2f}**"] for n in STREAMS]
    return table(
        f"Tokens/s, our engine called directly against vLLM's CPU build ({MODEL_ID}, bfloat16, greedy, {NEW_TOKENS} new tokens a stream)",
        ["concurrent streams", "ours tokens/s", "vLLM tokens/s", "ours / vLLM"], rows,
    )


# --- through the worker ---------------------------------------------------------------------


async def through_worker(redis_url: str, engine: Engine, settings: Settings, jobs: list[tuple[Conversation, str]]) -> list:
    """Submit the jobs together, serve them with a real worker, return the worker's 'job answered' records."""
    async with worker_running(redis_url, engine, settings) as run:
        for n, (conversation, text) in enumerate(jobs):
            await Intake(run.redis, settings.limits).submit(conversation, f"m{n}", text)
        return await run.answered(len(jobs))


def stream_seconds(vllm: VllmServer, prompt: list[int], max_tokens: int, end_ids: frozenset[int]) -> tuple[float, float]:
    """Seconds to the first streamed token and to the end, one request straight to vLLM."""
    body = {
        "model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "return_token_ids": True, "stop_token_ids": sorted(end_ids),
    }
    started = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{vllm.base_url}/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if first is None and line.startswith("data: {"):
                if any(choice.get("token_ids") for choice in json.loads(line[len("data: "):])["choices"]):
                    first = time.perf_counter() - started
    return first or 0.0, time.perf_counter() - started


# --- 2. the queue on top of a server ----------------------------------------------------------


def queue_cost(redis_url: str, engine: TransformersEngine, settings: Settings, vllm: VllmServer, rounds: int = 3) -> str:
    settings = settings.model_copy(update={"generation": settings.generation.model_copy(update={"max_new_tokens": NEW_TOKENS})})
    jobs = [(Conversation(platform="bench", channel=f"q{n}"), question) for n, question in enumerate(QUESTIONS[:4])]
    builder = PromptBuilder.for_settings(engine.tokenizer, settings)
    prompts = [builder.build([], text).ids for _, text in jobs]
    over_server = served_settings(settings, vllm)
    served = OpenAIEngine.load(over_server, api_key=None)
    ours, over_vllm, direct = [], [], []
    for _ in range(rounds):
        ours.append(statistics.median(r.total_s for r in asyncio.run(through_worker(redis_url, engine, settings, jobs))))
        vllm.reset_prefix_cache()
        over_vllm.append(
            statistics.median(r.total_s for r in asyncio.run(through_worker(redis_url, served, over_server, jobs)))
        )
        vllm.reset_prefix_cache()
        with ThreadPoolExecutor(len(prompts)) as pool:
            finals = list(pool.map(lambda p: stream_seconds(vllm, p, NEW_TOKENS, served.end_ids)[1], prompts))
        direct.append(statistics.median(finals))
    ours_s, over_s, direct_s = (statistics.median(values) for values in (ours, over_vllm, direct))
    rows = [
        ["vLLM called directly (same prompt ids)", f"{direct_s:.2f}", "**1.00**"],
        ["worker over `openai` -> vLLM", f"{over_s:.2f}", f"**{over_s / direct_s:.2f}**"],
        ["worker over our engine", f"{ours_s:.2f}", f"**{ours_s / direct_s:.2f}**"],
    ]
    return table(
        f"4 conversations at once, time to the final reply (median of {rounds} rounds of the median; "
        f"{NEW_TOKENS} new tokens at most, greedy; through Redis and the worker, batch 4)",
        ["path", "median time to final (s)", "/ vLLM directly"], rows,
    )


# --- 3. follow-ups ---------------------------------------------------------------------------


@dataclass
class FollowUp:
    prompt: list[int]
    ttft_s: float  # submission to first token, through Redis and the worker
    cached_tokens: int
    dropped_turns: int


async def conversation_through_worker(redis_url: str, engine: Engine, settings: Settings) -> list[FollowUp]:
    """One conversation of len(QUESTIONS) turns, each asked once the previous one is answered."""
    conversation = Conversation(platform="bench", channel="follow-ups")
    builder = PromptBuilder.for_settings(engine.tokenizer, settings)
    turns = []
    async with worker_running(redis_url, engine, settings) as run:
        for n, question in enumerate(QUESTIONS):
            prompt = builder.build(await load_exchanges(run.redis, conversation.key), question).ids
            await Intake(run.redis, settings.limits).submit(conversation, f"t{n}", question)
            record = (await run.answered(n + 1))[n]
            assert record.prompt_tokens == len(prompt), "the bench rebuilt another prompt than the worker"
            turns.append(FollowUp(prompt, record.ttft_s, record.cached_tokens, record.dropped_turns))
    return turns


def vllm_first_tokens(vllm: VllmServer, prompts: list[list[int]], end_ids: frozenset[int]) -> list[float]:
    vllm.reset_prefix_cache()
    return [stream_seconds(vllm, prompt, 1, end_ids)[0] for prompt in prompts]


def follow_ups(redis_url: str, engine: TransformersEngine, vllm: VllmServer) -> str:
    variants = {
        "no prefix cache": shipped_settings(prefix_cache_mb=0),
        "prefix cache (shipped)": shipped_settings(),
        "prefix cache, low water 0.6": shipped_settings(truncation_low_water=0.6),
    }
    ours = {}
    for name, settings in variants.items():
        turns_engine = TransformersEngine(
            engine.model, engine.tokenizer, settings.model.sequence_length, settings.model.batch_size, settings.generation,
            settings.model.prefix_cache_mb,
        )
        progress(f"    through the worker: {name}")
        ours[name] = asyncio.run(conversation_through_worker(redis_url, turns_engine, settings))
    progress("    vLLM on the same prompts")
    shipped, low = ours["prefix cache (shipped)"], ours["prefix cache, low water 0.6"]
    theirs = vllm_first_tokens(vllm, [turn.prompt for turn in shipped], engine.end_ids)
    theirs_low = vllm_first_tokens(vllm, [turn.prompt for turn in low], engine.end_ids)

    def ratios(turns: list[FollowUp], reference: list[float], first: int = 2, last: int = 28) -> list[float]:
        return [turns[t].ttft_s / reference[t] for t in range(first - 1, last)]

    rows = []
    for turn in SHOWN_TURNS:
        t = turn - 1
        rows.append([
            str(turn), str(len(shipped[t].prompt)), f"{ours['no prefix cache'][t].ttft_s:.2f}",
            f"{shipped[t].ttft_s:.2f} ({shipped[t].cached_tokens})", f"{theirs[t]:.2f}", f"**{shipped[t].ttft_s / theirs[t]:.2f}**",
            f"{low[t].ttft_s:.2f} ({low[t].cached_tokens})", f"{theirs_low[t]:.2f}", f"**{low[t].ttft_s / theirs_low[t]:.2f}**",
        ])
    shipped_ratios, low_ratios = ratios(shipped, theirs), ratios(low, theirs_low)
    full = next((n for n, turn in enumerate(shipped, 1) if turn.dropped_turns), "none")
    summary = [
        "turns 2-28: median / worst", "", "", "", "",
        f"**{statistics.median(shipped_ratios):.2f} / {max(shipped_ratios):.2f}**", "", "",
        f"**{statistics.median(low_ratios):.2f} / {max(low_ratios):.2f}**",
    ]
    return table(
        f"Follow-ups in one conversation: time to first token through the worker against vLLM on the same prompt ids "
        f"(shipped config.yaml, greedy, answers capped at {FOLLOW_UP_TOKENS} tokens; (n): prompt tokens from the prefix cache; "
        f"oldest exchanges dropped from turn {full})",
        ["turn", "prompt tokens", "ours, no cache (s)", "ours, prefix cache (s)", "vLLM (s)", "ours / vLLM",
         "ours, low water 0.6 (s)", "vLLM, same prompts (s)", "ours / vLLM"],
        rows + [summary],
    )


# --- 4. kill -9 and restart -----------------------------------------------------------------


async def server_killed_mid_answer(redis_url: str, settings: Settings, vllm: VllmServer) -> list[str]:
    settings = served_settings(settings, vllm)
    settings = settings.model_copy(update={"generation": settings.generation.model_copy(update={"max_new_tokens": NEW_TOKENS})})
    engine = OpenAIEngine.load(settings, api_key=None)
    jobs = 4
    async with worker_running(redis_url, engine, settings) as run:
        for n, question in enumerate(QUESTIONS[:jobs]):
            await Intake(run.redis, settings.limits).submit(Conversation(platform="bench", channel=f"k{n}"), f"k{n}", question)
        while await run.redis.zcard(keys.leases("default")) < jobs:
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)  # mid-answer
        killed = time.monotonic()
        await asyncio.to_thread(vllm.kill)
        await asyncio.sleep(2)
        await asyncio.to_thread(vllm.start)
        back = time.monotonic()
        await run.answered(jobs)
        done = time.monotonic()
        await asyncio.sleep(1)  # time for a duplicate to show, if there were one
        entries = [entry for shard in range(REPLY_SHARDS) for entry in await run.redis.xrange(keys.replies("bench", shard))]
    events = [ReplyEvent.model_validate_json(fields["event"]) for _, fields in entries]
    finals = sum(event.kind == "final" for event in events)
    errors = sum(event.kind == "error" for event in events)
    return [str(jobs), str(finals), str(errors), f"{back - killed:.0f}", f"{done - back:.1f}"]


# --- the run ----------------------------------------------------------------------------------


def run() -> str:
    path = resolve_model(MODEL_ID)
    settings = shipped_settings(prefix_cache_mb=0, batch_size=max(STREAMS))
    engine = MODEL_THREAD.submit(TransformersEngine.load, settings.model, settings.generation).result()
    builder = PromptBuilder.for_settings(engine.tokenizer, settings)
    with tempfile.TemporaryDirectory() as scratch:
        redis_server = RedisServer(Path(scratch) / "redis").start()
        vllm = VllmServer(path, SERVED, Path(scratch) / "vllm.log")
        try:
            progress("starting vLLM (1-3 minutes)")
            vllm.start()
            progress("1/4 tokens/s at 1, 4 and 8 streams")
            tables = [MODEL_THREAD.submit(throughput, engine, builder, vllm).result()]
            batch4 = shipped_settings(batch_size=4)
            four = TransformersEngine(engine.model, engine.tokenizer, 2048, 4, batch4.generation, batch4.model.prefix_cache_mb)
            progress("2/4 the queue on top of a server")
            tables.append(queue_cost(redis_server.url, four, batch4, vllm))
            progress("3/4 follow-ups through turn 30")
            tables.append(follow_ups(redis_server.url, engine, vllm))
            progress("4/4 kill -9 of the server mid-answer")
            killed = asyncio.run(server_killed_mid_answer(redis_server.url, batch4, vllm))
            tables.append(table(
                "kill -9 of the vLLM server mid-answer, restarted 2 s later, worker over `openai` (4 conversations, batch 4)",
                ["jobs", "final answers", "error answers", "server away (s)", "server back to last answer (s)"], [killed],
            ))
        finally:
            vllm.stop()
            redis_server.stop()
    return "\n\n".join(tables)

