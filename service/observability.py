"""Prometheus metrics and a /healthz that means something, for every chatbot process.

The worker and each adapter register the checks that say whether they are doing their job
(the worker's loop advanced recently, a platform connection is up) next to the Redis check;
/healthz answers 200 only when all pass, else 503 with the failing ones named.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from redis.asyncio import Redis

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)

# worker
JOBS = Counter(
    "chatbot_jobs_total", "Jobs by pool and outcome: answered, failed (answered with an error), redelivered", ["pool", "outcome"]
)
TIME_IN_QUEUE = Histogram("chatbot_time_in_queue_seconds", "Submission to claim", buckets=_LATENCY_BUCKETS)
TIME_TO_FIRST_TOKEN = Histogram("chatbot_time_to_first_token_seconds", "Submission to first token", buckets=_LATENCY_BUCKETS)
TIME_TO_FINAL = Histogram("chatbot_time_to_final_reply_seconds", "Submission to final reply", buckets=_LATENCY_BUCKETS)
PREFILLED_TOKENS = Counter(
    "chatbot_prefill_tokens_total", "Prompt tokens prefilled: computed, or taken from the prefix cache (cached)", ["source"]
)
PREFIX_CACHE_LOOKUPS = Counter("chatbot_prefix_cache_lookups_total", "Prefills that looked for a cached prefix", ["result"])
TOKENS = Counter(
    "chatbot_tokens_total", "Tokens of answered messages: prompt (in) and generated (out), as usage counts them",
    ["platform", "pool", "direction"],
)
GENERATED_TOKENS = Counter("chatbot_generated_tokens_total", "Tokens generated (rate() gives tokens/s)")
ACTIVE_SLOTS = Gauge("chatbot_active_slots", "Batch slots generating now", ["pool"])
QUEUED_JOBS = Gauge("chatbot_queued_jobs", "A pool's jobs waiting or being answered, all its workers (sampled by each)", ["pool"])
WAITING_CONVERSATIONS = Gauge("chatbot_waiting_conversations", "Conversations whose next message waits for a worker", ["pool"])
# adapters
DELIVERIES = Counter("chatbot_deliveries_total", "Reply events shown on a platform", ["platform", "kind"])
PLATFORM_ERRORS = Counter("chatbot_platform_errors_total", "Failed platform calls by kind", ["platform", "kind"])
FEEDBACK = Counter("chatbot_feedback_total", "Users' ratings of answers", ["platform", "rating"])
# every process
HEALTH_CHECKS = Gauge(
    "chatbot_health_check", "1 while a check of /healthz passes (redis, worker, engine, discord, slack), else 0", ["check"]
)

Check = Callable[[], Awaitable[str | None]]  # None when healthy, else what is wrong


class Health:
    def __init__(self) -> None:
        self.checks: dict[str, Check] = {}
        self.about: dict[str, str] = {}  # what the process serves (a worker's pool), shown beside the checks

    @contextmanager
    def checking(self, name: str, check: Check, about: dict[str, str] | None = None) -> Iterator[None]:
        """`check` (and `about`) is part of this process's health while the block runs."""
        self.checks[name] = check
        self.about.update(about or {})
        try:
            yield
        finally:
            if self.checks.get(name) is check:
                del self.checks[name]
            for key in about or {}:
                self.about.pop(key, None)

    async def report(self) -> dict[str, str]:
        results = {}
        for name, check in self.checks.items():
            try:
                results[name] = await asyncio.wait_for(check(), 2) or "ok"
            except Exception as error:  # a check that fails to answer is a failing check
                results[name] = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            HEALTH_CHECKS.labels(name).set(results[name] == "ok")
        return results


HEALTH = Health()  # the process's checks, as prometheus_client's registry holds its metrics


def redis_check(redis: Redis) -> Check:
    async def check() -> str | None:
        await redis.ping()
        return None

    return check


async def healthz(health: Health) -> web.Response:
    results = await health.report()
    healthy = all(result == "ok" for result in results.values())
    body = {"status": "ok" if healthy else "failing", "checks": results, **health.about}
    return web.json_response(body, status=200 if healthy else 503)


def add_routes(app: web.Application, health: Health) -> None:
    async def metrics(_: web.Request) -> web.Response:
        await health.report()  # each scrape carries the checks' state (chatbot_health_check), for alerts
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health_report(_: web.Request) -> web.Response:
        return await healthz(health)

    app.router.add_get("/healthz", health_report)
    app.router.add_get("/metrics", metrics)


@asynccontextmanager
async def serving(health: Health, port: int | None, host: str = "0.0.0.0") -> AsyncIterator[None]:
    """/metrics and /healthz on `port` while the block runs; nothing when port is None."""
    if port is None:
        yield
        return
    app = web.Application()
    add_routes(app, health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
            log.info("metrics and health served", extra={"port": port, "paths": ["/metrics", "/healthz"]})
        except OSError as error:
            log.error(f"metrics.port {port} cannot be used ({error.strerror}): set another one", extra={"port": port})
        yield
    finally:
        await runner.cleanup()
