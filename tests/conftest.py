"""Shared fixtures: a private redis-server per test session, the real tokenizers, a tiny model, a live worker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time

import pytest
from transformers import AutoTokenizer

from contract import keys
from contract.intake import Intake
from contract.jobs import ReplyEvent
from contract.replies import REPLY_SHARDS
from contract.work import WorkQueue
from engine.assets import resolve_model
from service.config import LimitSettings, Settings
from service.redis_client import connect
from service.redis_server import RedisServer


def started(command: list[str], env: dict[str, str], log_path, cwd=None) -> subprocess.Popen:
    """A process of ours, its stderr appended to `log_path` (the child keeps the file; this process closes its copy)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=log)


def pytest_configure(config):
    """The `chatbot` processes the tests start fail on a warning too, with the same exceptions, and
    never read the developer's own .env (its tokens, its REDIS_URL): only a test's own env file."""
    os.environ["PYTHONWARNINGS"] = ",".join(config.getini("filterwarnings"))
    os.environ["CHATBOT_ENV_FILE"] = os.devnull


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server):
    client = connect(redis_server.url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def llama_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("embedded:llama2-tokenizer"))


@pytest.fixture(scope="session")
def smollm2_path():
    return resolve_model("embedded:smollm2")


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny random Llama in float32, loaded once; engines around it are made per test."""
    from engine.serving.engine import MODEL_THREAD
    from engine.serving.transformers_engine import TransformersEngine

    return MODEL_THREAD.submit(TransformersEngine.load, tiny_settings().model, tiny_settings().generation).result()


def engine_for(loaded, settings: Settings):
    """A fresh engine (empty slots, these settings' sampling) around an already loaded model and tokenizer."""
    from engine.serving.transformers_engine import TransformersEngine

    model = settings.model
    return TransformersEngine(loaded.model, loaded.tokenizer, model.sequence_length, model.batch_size, settings.generation)


@pytest.fixture
def tiny_engine(tiny_model, settings):
    return engine_for(tiny_model, settings)


class Queues:
    """The adapters' side (submit) and the worker's side (the rest) of one queue, as one object for short tests."""

    def __init__(
        self, redis, visibility_timeout_s: float = 60.0, reply_stream_maxlen: int = 10_000, limits=None, affinity_wait_s: float = 0.0,
    ):
        self.intake = Intake(redis, limits or LimitSettings())
        self.work = WorkQueue(redis, visibility_timeout_s, reply_stream_maxlen, affinity_wait_s)

    def __getattr__(self, name: str):
        return getattr(self.intake if name == "submit" else self.work, name)


async def shards_held(redis, platform: str, timeout: float = 10.0) -> None:
    """Until every reply shard of the platform has a holder. An adapter just started finds them vacant and takes
    them two thirds of adapter_lease_s later (contract/reply_shards.py): replies written before then are
    delivered at once, as one batch, so a test of streaming waits for this first."""
    deadline = time.monotonic() + timeout
    while True:
        holders = [await redis.get(keys.reply_shard(platform, shard)) for shard in range(REPLY_SHARDS)]
        if all(holder and not holder.startswith("vacant:") and holder != "released" for holder in holders):
            return
        assert time.monotonic() < deadline, f"no {platform} adapter took the reply shards within {timeout:g} s"
        await asyncio.sleep(0.05)


def tiny_settings(**overrides) -> Settings:
    """Settings for the tiny random Llama: float32 (exact comparisons), short answers, quick redelivery."""
    base = {
        "model": {
            "id": "embedded:tiny-llama", "device": "cpu", "dtype": "float32", "sequence_length": 512, "max_prompt_tokens": 384,
        },
        "generation": {"max_new_tokens": 24},
        # adapter_lease_s: an adapter starts delivering 2/3 of it (1 s) after finding the reply shards vacant.
        "queue": {"visibility_timeout_s": 4, "step_timeout_s": 2, "partial_interval_s": 0.0, "adapter_lease_s": 1.5},
    }
    for section, values in overrides.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    return Settings.model_validate(base)


@pytest.fixture
def openai_engine():
    """Loads the openai engine for given settings; its connections are closed when the test ends."""
    from engine.serving.openai_engine import OpenAIEngine

    engines = []

    def load(settings: Settings):
        engines.append(OpenAIEngine.load(settings, api_key=None))
        return engines[-1]

    yield load
    for engine in engines:
        engine.client.close()


@pytest.fixture
def settings() -> Settings:
    return tiny_settings()


async def reply_events(redis, platform: str, job_id: str | None = None) -> list[ReplyEvent]:
    """What the worker published on a platform's reply stream (one job's, if given), oldest first."""
    entries = [entry for shard in range(REPLY_SHARDS) for entry in await redis.xrange(keys.replies(platform, shard))]
    entries.sort(key=lambda entry: tuple(map(int, entry[0].split("-"))))
    events = [ReplyEvent.model_validate_json(fields["event"]) for _, fields in entries]
    return [event for event in events if job_id is None or event.job_id == job_id]


async def reply_count(redis, platform: str) -> int:
    """Entries on a platform's reply shards."""
    return sum([await redis.xlen(keys.replies(platform, shard)) for shard in range(REPLY_SHARDS)])


async def final_event(redis, platform: str, job_id: str, timeout: float = 60) -> ReplyEvent:
    """The job's final or error event, once the worker has published it; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done = [event for event in await reply_events(redis, platform, job_id) if event.kind != "partial"]
        if done:
            return done[-1]
        assert time.monotonic() < deadline, f"no final reply for {job_id} within {timeout:g} s"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_worker(redis, engine, settings, owner: str = "test-worker"):
    """A real Worker serving in this test's event loop until the block ends."""
    from engine.worker import Worker

    worker = Worker(redis, engine, settings, owner=owner)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def worker(redis, tiny_engine, settings):
    async with running_worker(redis, tiny_engine, settings) as live:
        yield live


def run_staggered(scheduler, prompts: list[list[int]]) -> tuple[dict[int, list[int]], list[list[int]]]:
    """Admit the prompts in order whenever the scheduler has room; decode until every sequence ended.

    Returns each prompt's output and, per step, the prompts admitted before it.
    """
    outputs: dict[int, list[int]] = {}
    admitted: list[list[int]] = []
    pending = list(range(len(prompts)))
    while len(outputs) < len(prompts):
        admitted.append([])
        while pending and scheduler.room():
            index = pending.pop(0)
            admitted[-1].append(index)
            slot = scheduler.admit(prompts[index], index)
            if slot.ended:
                outputs[index] = slot.tokens
        for slot in scheduler.step():
            outputs[slot.payload] = slot.tokens
        assert len(admitted) < 500
    return outputs, admitted
