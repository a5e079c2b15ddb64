"""The worker over a real OpenAI-compatible server: vLLM's CPU build serving the embedded SmolLM2, through Redis.

One server for the module (it takes a minute or two to start). Between the worker and the
server sits a loopback link the tests can cut, to play a server outage mid-answer, and that
records the requests, to check the exact prompt token ids the worker sent.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from bench.vllm_server import VllmServer
from contract import keys
from contract.history import load_exchanges
from contract.jobs import Conversation
from engine.prompts import PromptBuilder
from engine.serving.engine import EngineRequestFailed
from engine.serving.openai_engine import OpenAIEngine
from engine.worker import MODEL_FAILED, readable_text
from service.observability import HEALTH
from tests.conftest import Queues, final_event, reply_events, running_worker
from tests.fakes.cuttable_link import CuttableLink
from tests.test_worker import worker_process

pytestmark = pytest.mark.timeout(420)  # the first test also starts the server

SERVED = "smollm2"
CHAT = Conversation(platform="local", channel="vllm")


@pytest.fixture(scope="module")
def vllm(smollm2_path, tmp_path_factory):
    server = VllmServer(smollm2_path, SERVED, tmp_path_factory.mktemp("vllm") / "vllm.log", eager=True).start()
    yield server
    server.stop()


@pytest.fixture
async def link(vllm):
    link = await CuttableLink(vllm.port).start()
    yield link
    await link.cut()


def openai_settings(base_url: str, **overrides):
    from service.config import Settings

    base = {
        "model": {"id": "embedded:smollm2", "backend": "openai", "batch_size": 4},
        "openai": {"base_url": base_url, "served_model": SERVED, "timeout_s": 5, "health_interval_s": 0.3},
        "generation": {"max_new_tokens": 40},
        "queue": {"visibility_timeout_s": 20, "step_timeout_s": 8, "partial_interval_s": 0.0},
    }
    for section, values in overrides.items():
        base[section] = {**base[section], **values}
    return Settings.model_validate(base)


def complete_directly(vllm: VllmServer, prompt: list[int], max_tokens: int) -> list[int]:
    """The server's greedy answer to these prompt ids, asked without the worker."""
    body = {"model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    [choice] = httpx.post(f"{vllm.base_url}/completions", json=body, timeout=60).json()["choices"]
    return choice["token_ids"]


async def test_a_streamed_answer_from_the_exact_prompt_ids(redis, vllm, link, openai_engine):
    settings = openai_settings(link.base_url)
    engine = openai_engine(settings)
    queues = Queues(redis)
    async with running_worker(redis, engine, settings):
        await queues.submit(CHAT, "q1", "Name three colours.", author="ann")
        assert (await final_event(redis, "local", "local:q1")).kind == "final"
        earlier = await load_exchanges(redis, CHAT.key)
        await queues.submit(CHAT, "q2", "And three animals?", author="ann")
        final = await final_event(redis, "local", "local:q2")

    assert final.kind == "final"
    assert [event.kind for event in await reply_events(redis, "local", "local:q2")][:-1].count("partial") >= 2
    expected = PromptBuilder.for_settings(engine.tokenizer, settings).build(earlier, "And three animals?", "ann").ids
    sent = link.requests("/completions")[-1]
    assert sent["prompt"] == expected and sent["stream"] is True
    # Nothing lost or added between the server's tokens and the reply: the same ids asked directly give the same text.
    alone = complete_directly(vllm, expected, sent["max_tokens"])
    assert final.text == readable_text(engine.tokenizer, [token for token in alone if token not in engine.end_ids])


async def test_an_outage_mid_answer_hands_the_job_back_and_it_is_answered_once(redis, vllm, link, openai_engine):
    settings = openai_settings(link.base_url, generation={"max_new_tokens": 300})
    engine = openai_engine(settings)
    async with running_worker(redis, engine, settings):
        await Queues(redis).submit(CHAT, "long", "Write a long story about a lighthouse keeper.")
        while not await reply_events(redis, "local", "local:long"):
            await asyncio.sleep(0.02)
        await link.cut()
        while await redis.zcard(keys.leases("default")):  # handed back, not left to a lease
            await asyncio.sleep(0.05)
        assert await redis.hget(keys.job("local:long"), "attempts") in (None, "0")  # uncharged
        await asyncio.sleep(1.0)  # the worker claims nothing while the server is away
        assert await redis.lrange(keys.ready("default"), 0, -1) == [CHAT.key]
        assert "unreachable" in (await HEALTH.report())["engine"]
        await link.restore()
        final = await final_event(redis, "local", "local:long", timeout=120)

    events = await reply_events(redis, "local", "local:long")
    assert final.kind == "final" and [event.kind for event in events].count("final") == 1
    assert "error" not in {event.kind for event in events}
    assert len(await load_exchanges(redis, CHAT.key)) == 1


async def test_a_worker_started_while_the_server_is_away_waits_for_it(redis, vllm, link, openai_engine):
    settings = openai_settings(link.base_url)
    await link.cut()
    await Queues(redis).submit(CHAT, "early", "Hello there.")
    async with running_worker(redis, openai_engine(settings), settings):
        await asyncio.sleep(1.5)
        assert not await reply_events(redis, "local") and not await redis.zcard(keys.leases("default"))
        await link.restore()
        assert (await final_event(redis, "local", "local:early")).kind == "final"


async def test_sigterm_hands_back_and_the_server_stops_generating(redis, redis_server, vllm, tmp_path):
    await Queues(redis).submit(CHAT, "m1", "Write a long story about the sea.")
    process = worker_process(
        redis_server.url, tmp_path, CHATBOT__MODEL__ID="embedded:smollm2", CHATBOT__MODEL__BACKEND="openai",
        CHATBOT__OPENAI__BASE_URL=vllm.base_url, CHATBOT__OPENAI__SERVED_MODEL=SERVED, CHATBOT__OPENAI__TIMEOUT_S="5",
        CHATBOT__MODEL__MAX_PROMPT_TOKENS="1536", CHATBOT__MODEL__SEQUENCE_LENGTH="2048",
        CHATBOT__GENERATION__MAX_NEW_TOKENS="500", CHATBOT__QUEUE__STEP_TIMEOUT_S="8", CHATBOT__QUEUE__VISIBILITY_TIMEOUT_S="20",
    )
    try:
        deadline = time.monotonic() + 120
        while not await reply_events(redis, "local", "local:m1"):
            assert process.poll() is None, f"the worker exited; see {tmp_path / 'worker.log'}"
            assert time.monotonic() < deadline, "no partial answer within 120 s"
            await asyncio.sleep(0.05)
        assert vllm.metric("vllm:num_requests_running") == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        process.kill()
    assert await redis.zcard(keys.leases("default")) == 0 and await redis.lrange(keys.ready("default"), 0, -1) == [CHAT.key]
    assert "final" not in {event.kind for event in await reply_events(redis, "local")}
    deadline = time.monotonic() + 5  # the closed stream aborts the request: no 500 tokens generated for nobody
    while vllm.metric("vllm:num_requests_running"):
        assert time.monotonic() < deadline, "the server kept generating for a job handed back"
        await asyncio.sleep(0.1)


class OutOfVocabularyEngine(OpenAIEngine):
    """Sends every prompt with a token id the model does not have: a request the real server refuses while well."""

    def prefill_many(self, requests: list[tuple[int, list[int]]]) -> list[int | Exception]:
        return super().prefill_many([(slot, [*prompt, 10**8]) for slot, prompt in requests])


async def test_a_request_the_server_refuses_while_well_fails_only_that_job(redis, vllm, openai_engine):
    settings = openai_settings(vllm.base_url)
    loaded = openai_engine(settings)
    engine = OutOfVocabularyEngine(
        loaded.client, SERVED, loaded.tokenizer, loaded.end_ids, loaded.sequence_length, loaded.batch_size, settings.generation,
        settings.openai.timeout_s,
    )
    async with running_worker(redis, engine, settings):
        await Queues(redis).submit(CHAT, "bad", "Hello.")
        failed = await final_event(redis, "local", "local:bad")
    assert failed.kind == "error" and failed.text == MODEL_FAILED
    assert not await redis.zcard(keys.leases("default")) and not await redis.llen(keys.ready("default"))  # answered, not handed back


def test_a_stream_line_that_is_not_json_fails_the_request_not_the_worker(openai_engine):
    class Garbled(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b"data: {not json\n\n")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Garbled)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        engine = openai_engine(openai_settings(f"http://127.0.0.1:{server.server_port}/v1"))
        [failure] = engine.prefill_many([(0, [1, 2, 3])])
    finally:
        server.shutdown()
        server.server_close()
    assert isinstance(failure, EngineRequestFailed) and "not JSON" in str(failure) and not failure.server_fault
