"""Metrics and health, read over HTTP as Prometheus and a load balancer read them."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import aiohttp

from contract.jobs import Conversation
from service.observability import HEALTH, Health, redis_check, serving
from service.redis_client import connect
from service.redis_server import free_port
from tests.conftest import Queues, final_event, running_worker, started

ROOT = Path(__file__).resolve().parents[1]


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=10)) as response:
            return response.status, await response.text()


async def test_healthz_names_what_fails(redis):
    health, port = Health(), free_port()
    dead = connect("redis://127.0.0.1:1/0")
    async with serving(health, port):
        with health.checking("redis", redis_check(redis)):
            status, body = await get(port, "/healthz")
            assert status == 200 and '"redis": "ok"' in body
            with health.checking("redis", redis_check(dead)):
                status, body = await get(port, "/healthz")
    assert status == 503 and '"status": "failing"' in body and "ConnectionError" in body
    await dead.aclose()


async def test_the_worker_is_unhealthy_when_its_loop_stops_coming_round(redis, tiny_engine, settings):
    async with running_worker(redis, tiny_engine, settings) as worker:
        for _ in range(100):
            if "worker" in HEALTH.checks:
                break
            await asyncio.sleep(0.01)
        assert await HEALTH.report() == {"worker": "ok", "engine": "ok"}
        worker._turn_at -= settings.queue.step_timeout_s + 60  # as if a step had hung for a minute
        assert (await HEALTH.checks["worker"]()).startswith("the serving loop has not come round for")
    assert "worker" not in HEALTH.checks  # a stopped worker takes its check away


async def test_a_worker_process_serves_metrics_and_health(redis, redis_server, tmp_path):
    port = free_port()
    env = {
        **os.environ, "REDIS_URL": redis_server.url, "CHATBOT_CONFIG": str(tmp_path / "none.yaml"),
        "CHATBOT__RUN_DIR": str(tmp_path), "CHATBOT__MODEL__ID": "embedded:tiny-llama", "CHATBOT__MODEL__DEVICE": "cpu",
        "CHATBOT__MODEL__SEQUENCE_LENGTH": "512", "CHATBOT__MODEL__MAX_PROMPT_TOKENS": "256",
        "CHATBOT__GENERATION__MAX_NEW_TOKENS": "16", "CHATBOT__METRICS__PORT": str(port),
    }
    process = started([sys.executable, "-m", "chatbot", "worker"], env, tmp_path / "worker.log", cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = await get(port, "/healthz")
                if status == 200 and '"worker": "ok"' in body and '"pool": "default"' in body:
                    break
            except aiohttp.ClientError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
            await asyncio.sleep(0.2)
        submitted = await Queues(redis).submit(Conversation(platform="local", channel="m"), "m1", "Hello!")
        assert (await final_event(redis, "local", submitted.job_id)).kind == "final"
        _, metrics = await get(port, "/metrics")
    finally:
        process.terminate()
        process.wait(20)
    assert 'chatbot_jobs_total{outcome="answered",pool="default"} 1.0' in metrics
    assert 'chatbot_health_check{check="worker"} 1.0' in metrics and 'chatbot_health_check{check="redis"} 1.0' in metrics
    assert "chatbot_time_to_first_token_seconds_count 1.0" in metrics
    assert "chatbot_time_to_final_reply_seconds_count 1.0" in metrics
    assert "chatbot_time_in_queue_seconds_count 1.0" in metrics
    assert "chatbot_generated_tokens_total" in metrics and 'chatbot_active_slots{pool="default"}' in metrics
