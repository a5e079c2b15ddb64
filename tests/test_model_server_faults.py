"""The worker over a model server that is busy, failing or cut mid-answer (tests/fakes/model_server.py), through
the real openai engine, worker and Redis: nothing lost, nothing doubled, nothing charged wrongly.

One rule (engine/serving/engine.py, EngineRequestFailed): a timeout, a 5xx or a stream cut is the server's
fault, and the job goes back to the queue uncharged, at most MAX_SERVER_FAULTS times; a 4xx is the request's,
and the job is answered with an error. `GET /v1/models` answering meanwhile changes neither.
"""

from __future__ import annotations

import time

import pytest
from transformers import AutoTokenizer

from contract import keys
from contract.history import load_exchanges
from contract.jobs import Conversation
from contract.usage import day
from engine.assets import resolve_model
from engine.worker import MAX_SERVER_FAULTS, MODEL_FAILED, SERVER_KEPT_FAILING
from tests.conftest import Queues, final_event, reply_events, running_worker
from tests.fakes.model_server import FakeModelServer

CHAT = Conversation(platform="local", channel="server")
ANSWER = "The lighthouse keeper watched the sea all night, and the ships went by safely."
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("embedded:smollm2"))


@pytest.fixture
async def server(tokenizer):
    fake = await FakeModelServer(
        "smollm2", tokenizer.encode(ANSWER, add_special_tokens=False), end_id=tokenizer.convert_tokens_to_ids("<|im_end|>")
    ).start()
    yield fake
    await fake.stop()


def settings_for(server: FakeModelServer, batch_size: int = 1, timeout_s: float = TIMEOUT_S, step_timeout_s: float = 3,
                 max_new_tokens: int = 60):
    from service.config import Settings

    return Settings.model_validate({
        "model": {"id": "embedded:smollm2", "backend": "openai", "batch_size": batch_size},
        "openai": {"base_url": server.base_url, "served_model": "smollm2", "timeout_s": timeout_s, "health_interval_s": 0.2},
        "generation": {"max_new_tokens": max_new_tokens},
        "queue": {"visibility_timeout_s": 8, "step_timeout_s": step_timeout_s, "partial_interval_s": 0.0},
    })


async def answered_once(redis, job_id: str) -> str:
    final = await final_event(redis, "local", job_id, timeout=30)
    kinds = [event.kind for event in await reply_events(redis, "local", job_id)]
    assert final.kind == "final" and kinds.count("final") == 1 and "error" not in kinds, kinds
    assert await redis.hget(keys.usage_day(day()) + "author:messages", "local:alice") == "1"  # charged once
    assert len(await load_exchanges(redis, CHAT.key)) == 1
    return final.text


@pytest.mark.parametrize("fault", ["busy", "5xx", "cut"])
async def test_a_server_fault_hands_the_job_back_uncharged_and_it_is_answered_once(redis, server, openai_engine, fault):
    """Before: each failed the job with "Sorry, something went wrong" (a cut replacing text already shown), since
    the fault was decided from GET /v1/models, which the server answered at once."""
    {"busy": lambda: server.slow_first_token(TIMEOUT_S * 2), "5xx": lambda: server.status(503),
     "cut": lambda: server.cut_after(5)}[fault]()
    settings = settings_for(server)
    async with running_worker(redis, openai_engine(settings), settings):
        submitted = await Queues(redis).submit(CHAT, "m1", "Tell me about the lighthouse.", author_id="alice")
        assert await answered_once(redis, submitted.job_id) == ANSWER
    assert len(server.requests) == 2
    assert await redis.get(keys.done(submitted.job_id))


async def test_a_server_that_keeps_failing_a_job_answers_it_after_a_bounded_number_of_tries(redis, server, openai_engine):
    server.status(503, times=MAX_SERVER_FAULTS + 5)
    settings = settings_for(server)
    async with running_worker(redis, openai_engine(settings), settings):
        submitted = await Queues(redis).submit(CHAT, "m1", "Hello", author_id="alice")
        told = await final_event(redis, "local", submitted.job_id, timeout=30)
    assert (told.kind, told.text) == ("error", SERVER_KEPT_FAILING)
    assert len(server.requests) == MAX_SERVER_FAULTS + 1
    assert await redis.hget(keys.usage_day(day()) + "author:messages", "local:alice") is None  # nothing charged


async def test_a_request_the_server_refuses_is_the_jobs_fault_and_answered_at_once(redis, server, openai_engine):
    server.status(400)
    settings = settings_for(server)
    async with running_worker(redis, openai_engine(settings), settings):
        submitted = await Queues(redis).submit(CHAT, "m1", "Hello", author_id="alice")
        told = await final_event(redis, "local", submitted.job_id, timeout=30)
    assert (told.kind, told.text) == ("error", MODEL_FAILED) and len(server.requests) == 1


async def test_a_busy_server_serving_its_streams_in_turn_is_waited_for_and_no_step_outlasts_its_timeout(redis, server, openai_engine):
    """Before: slots were read one after another, each read within timeout_s, so four slots of a server serving
    its streams in turn made one step last a whole round (1 s here), past step_timeout_s (0.8 s): the worker
    exited as stuck, and every admission of four crashed it again."""
    server.busy(0.25)  # one token every 0.25 s across all streams: each of four gets one a second
    settings = settings_for(server, batch_size=4, timeout_s=0.5, step_timeout_s=0.8, max_new_tokens=6)
    engine = openai_engine(settings)
    steps: list[float] = []
    timed = engine.decode

    def decode(slots):
        started = time.monotonic()
        try:
            return timed(slots)
        finally:
            steps.append(time.monotonic() - started)

    engine.decode = decode
    queue = Queues(redis)
    async with running_worker(redis, engine, settings):
        jobs = [await queue.submit(Conversation(platform="local", channel=f"c{n}"), f"m{n}", "Hello") for n in range(4)]
        finals = [await final_event(redis, "local", job.job_id, timeout=60) for job in jobs]
    assert [final.kind for final in finals] == ["final"] * 4, [final.text for final in finals]
    assert max(steps) < 0.5 + 0.2, max(steps)
    assert len(server.requests) == 4  # none handed back: a busy server is waited for
