"""Capacity: what one message costs Redis, the worker and the adapter, with an engine that answers at once.

Two cores cannot host the 16 busy workers a ceiling test would need, so this measures per
message, at a load the VM carries, and leaves the extrapolation to docs/scaling.md. Messages go
through the real Intake (the adapter's submit), real Worker processes (one process each, as in
production, with bench.queue_overhead's instant engine) and a real Delivery reading the reply
shards in the adapter's process, with an in-memory Outbox: the adapter's platform side
(discord.py, slack-sdk, their HTTP and gateway traffic) is excluded.

Per message, over a measured window of Poisson arrivals:
- Redis: commands executed (diff of INFO commandstats; commands run inside Lua scripts count,
  as Redis counts them), network bytes in and out (INFO stats), CPU (INFO cpu, the whole
  process and its main thread, which is what a single Redis primary is bound by);
- worker CPU: user + system time of the worker processes (/proc/<pid>/stat), all threads;
- adapter CPU: time.process_time() of this process (Intake.submit, Delivery, the in-memory
  outbox and the load generator's bookkeeping);
- queue overhead: submission to the final reply shown by the outbox.

Everything in the window counts, idle background included (worker heartbeats and blocking
waits, the adapter's shard leases and blocking reads); the idle rate is measured on its own.
Baselines in the same run: a Redis PING round trip (latencies, CPU per message) and Redis's own
CPU per PING (Redis CPU per message).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis as sync_redis
from transformers import AutoTokenizer

from bench.common import median, percentile, progress, table
from bench.queue_overhead import InstantEngine
from bot.delivery import Delivery, Part
from contract.intake import Intake
from contract.jobs import Conversation
from engine.assets import resolve_model
from engine.worker import Worker
from service.config import LimitSettings, Settings
from service.redis_client import connect
from service.redis_server import RedisServer

PLATFORM = "bench"
PINGS = 2000
IDLE_S = 3.0
CONVERSATIONS = 40
TOP_COMMANDS = 12  # commands named in the by-name table; the rest are summed
# Adapters pass each message's author: the submit script then counts the author's queue and rate.
# One author per conversation here, sending faster than the shipped per-author limits allow.
LIMITS = LimitSettings(max_queued_per_conversation=1000, max_queued_per_author=1000, messages_per_minute_per_author=100_000)


@dataclass(frozen=True)
class Phase:
    label: str
    workers: int
    messages: int
    rate: float  # offered messages per second, Poisson arrivals
    answer_tokens: int = 1  # 1: "ok" (one partial, then the final); more: one partial per token
    partial_interval_s: float = 0.25  # the shipped default


PHASES = [
    Phase("1 worker", 1, 800, 80.0),
    Phase("4 workers", 4, 800, 80.0),
    # Every token streamed as a partial (partial_interval_s 0): the difference from "1 worker"
    # is what each partial reply costs, which a real answer pays once per partial_interval_s.
    Phase("1 worker, 16-token answers, a partial per token", 1, 250, 20.0, answer_tokens=16, partial_interval_s=0.0),
]


class CountingEngine(InstantEngine):
    """The instant engine, answering `tokens` tokens ("ok ok ...") before it ends the turn."""

    def __init__(self, tokenizer, tokens: int):
        super().__init__(tokenizer)
        self.tokens = tokens
        self.left: dict[int, int] = {}

    def prefill(self, slot: int, prompt: list[int]) -> int:
        self.left[slot] = self.tokens - 1
        return self.answer

    def decode(self, slots: list[int]) -> list[int]:
        out = []
        for slot in slots:
            self.left[slot] = self.left.get(slot, 0) - 1
            out.append(self.answer if self.left[slot] >= 0 else self.tokenizer.eos_token_id)
        return out


def serve(url: str, ready, owner: str, tokens: int, partial_interval_s: float) -> None:
    """One worker process, as in production, over the counting engine."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("embedded:llama2-tokenizer"))

    async def main() -> None:
        redis = connect(url)
        settings = Settings.model_validate({"queue": {"partial_interval_s": partial_interval_s}})
        worker = Worker(redis, CountingEngine(tokenizer, tokens), settings, owner=owner)
        signal.signal(signal.SIGTERM, lambda *_: worker.stop())
        ready.set()
        await worker.run()
        await redis.aclose()

    asyncio.run(main())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process, all its threads, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class MemoryOutbox:
    """The Outbox protocol with nothing behind it: notes when each job's final text is shown."""

    limit = 2000
    settles = True

    def __init__(self) -> None:
        self.posted = 0
        self.final_at: dict[str, float] = {}

    def refused(self, error: Exception) -> bool:
        return False  # nothing fails here

    async def post(self, part: Part) -> str:
        self.posted += 1
        self._shown(part)
        return str(self.posted)

    async def edit(self, message_id: str, part: Part) -> None:
        self._shown(part)

    async def remove(self, message_id: str, reply_to: dict[str, str]) -> None:
        pass

    def _shown(self, part: Part) -> None:
        if part.feedback:  # the last message of a final answer
            self.final_at.setdefault(part.job_id, time.perf_counter())


@dataclass
class Snapshot:
    commands: dict[str, int]
    net_in: int
    net_out: int
    redis_cpu: float
    redis_main_cpu: float
    worker_cpu: float
    adapter_cpu: float
    at: float

    @staticmethod
    def take(client: sync_redis.Redis, workers: list[int]) -> Snapshot:
        stats, cpu = client.info("stats"), client.info("cpu")
        commands = {name.removeprefix("cmdstat_"): v["calls"] for name, v in client.info("commandstats").items()}
        return Snapshot(
            commands=commands,
            net_in=stats["total_net_input_bytes"],
            net_out=stats["total_net_output_bytes"],
            redis_cpu=cpu["used_cpu_sys"] + cpu["used_cpu_user"],
            redis_main_cpu=cpu.get("used_cpu_sys_main_thread", 0.0) + cpu.get("used_cpu_user_main_thread", 0.0),
            worker_cpu=sum(cpu_seconds(pid) for pid in workers),
            adapter_cpu=time.process_time(),
            at=time.perf_counter(),
        )


@dataclass
class Costs:
    """What a window cost, divided by `count` (messages, or seconds for the idle window)."""

    count: float
    commands: dict[str, float] = field(default_factory=dict)
    net_in: float = 0.0
    net_out: float = 0.0
    redis_cpu: float = 0.0
    redis_main_cpu: float = 0.0
    worker_cpu: float = 0.0
    adapter_cpu: float = 0.0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @staticmethod
    def between(before: Snapshot, after: Snapshot, count: float) -> Costs:
        commands = {
            name: (calls - before.commands.get(name, 0)) / count
            for name, calls in after.commands.items() if name not in ("info", "ping")
        }
        return Costs(
            count=count,
            commands={name: n for name, n in commands.items() if n > 0},
            net_in=(after.net_in - before.net_in) / count,
            net_out=(after.net_out - before.net_out) / count,
            redis_cpu=(after.redis_cpu - before.redis_cpu) / count,
            redis_main_cpu=(after.redis_main_cpu - before.redis_main_cpu) / count,
            worker_cpu=(after.worker_cpu - before.worker_cpu) / count,
            adapter_cpu=(after.adapter_cpu - before.adapter_cpu) / count,
            seconds=after.at - before.at,
        )

    @property
    def total_commands(self) -> float:
        return sum(self.commands.values())


async def baseline(url: str) -> tuple[float, float]:
    """The median PING round trip, and Redis's CPU per PING (whole process), in seconds."""
    client = sync_redis.Redis.from_url(url)
    redis = connect(url)
    cpu = client.info("cpu")
    pings = []
    for _ in range(PINGS):
        started = time.perf_counter()
        await redis.ping()
        pings.append(time.perf_counter() - started)
    after = client.info("cpu")
    await redis.aclose()
    client.close()
    used = (after["used_cpu_sys"] + after["used_cpu_user"]) - (cpu["used_cpu_sys"] + cpu["used_cpu_user"])
    return median(pings), used / PINGS


async def drive(url: str, phase: Phase, index: int, workers: list[int], idle: bool) -> tuple[Costs | None, Costs]:
    """The adapter's side of one phase: the idle window (if asked), then the load window."""
    redis = connect(url)
    client = sync_redis.Redis.from_url(url)
    outbox = MemoryOutbox()
    delivery = Delivery(redis, PLATFORM, outbox, edit_interval_s=0.0, lease_s=Settings().queue.adapter_lease_s,
                        holder=f"bench-adapter-{index}")
    delivering = asyncio.create_task(delivery.run())
    intake = Intake(redis, LIMITS)
    rng = random.Random(index)
    conversations = [Conversation(platform=PLATFORM, channel=f"p{index}c{n}") for n in range(CONVERSATIONS)]
    try:
        # Warm up: every conversation once (scripts loaded, groups made, shards taken), then settle.
        for n, conversation in enumerate(conversations):
            await intake.submit(conversation, f"p{index}-warm{n}", "hello", author=f"a{n}", author_id=f"U{n}")
        while len(outbox.final_at) < len(conversations):
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)
        idle_costs = None
        if idle:
            progress(f"scale: idle window, {IDLE_S:.0f} s")
            before = Snapshot.take(client, workers)
            await asyncio.sleep(IDLE_S)
            after = Snapshot.take(client, workers)
            idle_costs = Costs.between(before, after, after.at - before.at)  # per second

        progress(f"scale: {phase.label}: {phase.messages} messages at {phase.rate:.0f}/s")
        submitted: dict[str, float] = {}
        before = Snapshot.take(client, workers)
        start = time.perf_counter()
        due = start
        for n in range(phase.messages):
            due += rng.expovariate(phase.rate)
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            c = n % CONVERSATIONS
            sent_at = time.perf_counter()
            done = await intake.submit(conversations[c], f"p{index}-{n}", f"message number {n}", author=f"a{c}", author_id=f"U{c}")
            submitted[done.job_id] = sent_at
        deadline = time.perf_counter() + 60
        while any(job not in outbox.final_at for job in submitted):
            if delivering.done():
                delivering.result()  # delivery's own failure
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{phase.label}: {sum(j not in outbox.final_at for j in submitted)} replies never shown")
            await asyncio.sleep(0.002)
        after = Snapshot.take(client, workers)
        costs = Costs.between(before, after, phase.messages)
        costs.latencies = [outbox.final_at[job] - at for job, at in submitted.items()]
        return idle_costs, costs
    finally:
        delivering.cancel()
        try:
            await delivering
        except asyncio.CancelledError:
            pass
        await redis.aclose()
        client.close()


def run_phase(url: str, phase: Phase, index: int, idle: bool) -> tuple[Costs | None, Costs]:
    progress(f"scale: starting {phase.workers} worker process(es)")
    processes = []
    for w in range(phase.workers):
        ready = multiprocessing.Event()
        process = multiprocessing.Process(
            target=serve, args=(url, ready, f"bench-{index}-{w}", phase.answer_tokens, phase.partial_interval_s)
        )
        process.start()
        processes.append((process, ready))
    try:
        for _, ready in processes:
            if not ready.wait(120):
                raise RuntimeError("a worker did not start")
        return asyncio.run(drive(url, phase, index, [p.pid for p, _ in processes], idle))
    finally:
        for process, _ in processes:
            process.terminate()
        for process, _ in processes:
            process.join(30)


def run() -> str:
    results: list[tuple[Phase, Costs]] = []
    with tempfile.TemporaryDirectory() as data, RedisServer(Path(data)) as server:
        progress(f"scale: baseline, {PINGS} PINGs")
        ping, ping_cpu = asyncio.run(baseline(server.url))
        idle_costs = None
        for index, phase in enumerate(PHASES):
            idle, costs = run_phase(server.url, phase, index, idle=index == 0)
            idle_costs = idle_costs or idle
            results.append((phase, costs))
    return render(ping, ping_cpu, idle_costs, results)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs"


def render(ping: float, ping_cpu: float, idle: Costs | None, results: list[tuple[Phase, Costs]]) -> str:
    (_, one), (_, four), (stream_phase, stream) = results
    extra_partials = stream_phase.answer_tokens - 1
    rows = []

    def row(what: str, value, fmt, baseline: float | None = None, unit: str = "x PING", per_partial: bool = True) -> None:
        cells = [what] + [fmt(value(c)) for c in (one, four)]
        cells.append(f"{value(one) / baseline:.1f}{unit}" if baseline else "")
        cells.append(fmt((value(stream) - value(one)) / extra_partials) if per_partial else "")
        rows.append(cells)

    row("Redis commands executed (incl. inside scripts)", lambda c: c.total_commands, lambda v: f"{v:.1f}")
    row("of which scripts (EVALSHA)", lambda c: c.commands.get("evalsha", 0.0), lambda v: f"{v:.1f}")
    row("Redis bytes in (from clients)", lambda c: c.net_in, lambda v: f"{v:,.0f} B")
    row("Redis bytes out (to clients)", lambda c: c.net_out, lambda v: f"{v:,.0f} B")
    row("Redis CPU (process)", lambda c: c.redis_cpu, us, ping_cpu, " PINGs")
    row("Redis CPU (main thread)", lambda c: c.redis_main_cpu, us, ping_cpu, " PINGs")
    row("worker CPU (all worker processes)", lambda c: c.worker_cpu, us, ping)
    row("adapter CPU (submit + Delivery, in-memory outbox)", lambda c: c.adapter_cpu, us, ping)
    rows.append(["queue overhead, median (submit -> final shown)", *(f"{median(c.latencies) * 1000:.2f} ms" for c in (one, four)),
                 f"{median(one.latencies) / ping:.1f}x PING", ""])
    rows.append(["queue overhead, p99", *(f"{percentile(c.latencies, 0.99) * 1000:.2f} ms" for c in (one, four)),
                 f"{percentile(one.latencies, 0.99) / ping:.1f}x PING", ""])
    ceiling = 1 / one.redis_main_cpu if one.redis_main_cpu else float("inf")
    rows.append(["one Redis primary, ceiling (extrapolated, single-threaded Redis, this VM)",
                 f"{ceiling:,.0f} msg/s", f"{1 / four.redis_main_cpu:,.0f} msg/s" if four.redis_main_cpu else "", "", ""])
    main = table(
        f"Scale: cost per message ({one.count} messages over {CONVERSATIONS} conversations at {PHASES[0].rate:.0f}/s, "
        f"Poisson; instant engine, worker processes; baseline: Redis PING round trip, median {ping * 1000:.3f} ms, "
        f"and Redis CPU per PING, {ping_cpu * 1e6:.1f} µs)",
        ["per message", "1 worker", "4 workers", "1 worker vs baseline", f"each extra partial reply (from {stream.count} "
         f"{stream_phase.answer_tokens}-token answers at {stream_phase.rate:.0f}/s)"],
        rows,
    )
    top = sorted(one.commands.items(), key=lambda item: -item[1])
    shown, rest = top[:TOP_COMMANDS], top[TOP_COMMANDS:]
    command_rows = [[name, f"{n:.2f}", f"{four.commands.get(name, 0.0):.2f}",
                     f"{(stream.commands.get(name, 0.0) - n) / extra_partials:.2f}"] for name, n in shown]
    named = {name for name, _ in shown}

    def others(c: Costs) -> float:
        return sum(n for name, n in c.commands.items() if name not in named)

    command_rows.append([f"{len(rest)} others", f"{others(one):.2f}", f"{others(four):.2f}",
                         f"{(others(stream) - others(one)) / extra_partials:.2f}"])
    commands = table(
        "Scale: Redis commands per message, by name (commands inside Lua scripts included)",
        ["command", "1 worker", "4 workers", "each extra partial reply"], command_rows,
    )
    parts = [main, commands]
    if idle:
        parts.append(
            f"Idle background (1 worker, 1 adapter, no messages, {IDLE_S:.0f} s): {idle.total_commands:.1f} Redis commands/s, "
            f"Redis CPU {idle.redis_cpu * 1e3:.2f} ms/s, worker CPU {idle.worker_cpu * 1e3:.1f} ms/s, "
            f"adapter CPU {idle.adapter_cpu * 1e3:.1f} ms/s."
        )
    return "\n\n".join(parts)
