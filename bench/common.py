"""Helpers for the benchmarks: timing, a real worker serving through Redis, a markdown table."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable

from redis.asyncio import Redis

from engine.serving.engine import Engine
from engine.worker import Worker
from service.config import Settings
from service.redis_client import connect


def best_of(repeats: int, work: Callable[[], object]) -> float:
    """Fastest of `repeats` runs, in seconds: the least disturbed by a noisy machine."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def progress(message: str) -> None:
    """A line on stderr while a long benchmark runs; the tables go to stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class WorkerRun(logging.Handler):
    """A real worker serving in this event loop, and its 'job answered' log records."""

    def __init__(self, redis: Redis, worker: Worker):
        super().__init__()
        self.redis = redis
        self.records: list[logging.LogRecord] = []
        self._task = asyncio.create_task(worker.run())

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "job answered":
            self.records.append(record)

    async def answered(self, count: int) -> list[logging.LogRecord]:
        """Wait until `count` jobs are answered (the worker's own failure is raised)."""
        while len(self.records) < count:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the worker stopped")
            await asyncio.sleep(0.005)
        return self.records[:count]


@contextlib.asynccontextmanager
async def worker_running(redis_url: str, engine: Engine, settings: Settings) -> AsyncIterator[WorkerRun]:
    """A worker over `engine` on an emptied Redis until the block ends."""
    redis = connect(redis_url)
    await redis.flushdb()
    worker = Worker(redis, engine, settings, owner="bench")
    logger = logging.getLogger("engine.worker")
    level = logger.level
    logger.setLevel(logging.INFO)
    run = WorkerRun(redis, worker)
    logger.addHandler(run)
    try:
        yield run
    finally:
        worker.stop()
        await asyncio.wait_for(run._task, 60)
        logger.removeHandler(run)
        logger.setLevel(level)
        await redis.aclose()
