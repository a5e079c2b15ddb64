"""Stop and regenerate, through the real worker, the tiny model and Redis (the platforms' buttons are in their own tests)."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from contract import history, keys
from contract.controls import ALREADY_FINISHED, NOT_YOURS, ONLY_THE_LATEST, STOPPING, request_stop
from contract.intake import Intake
from contract.jobs import Conversation, RejectedMessage
from engine.serving.transformers_engine import TransformersEngine
from engine.worker import STOPPED_BEFORE_ANSWER, STOPPED_NOTE
from service.config import LimitSettings
from tests.conftest import final_event, reply_events, running_worker, tiny_settings

CHAT = Conversation(platform="local", channel="controls")
STEP_S = 0.02


class SlowEngine(TransformersEngine):
    """The tiny model at the pace of a large one (20 ms a step), so that an answer streams long enough to be stopped."""

    def decode(self, slots: list[int]) -> list[int]:
        time.sleep(STEP_S)
        return super().decode(slots)


def slow_engine(tiny_model, settings) -> SlowEngine:
    model = settings.model
    return SlowEngine(tiny_model.model, tiny_model.tokenizer, model.sequence_length, model.batch_size, settings.generation)


async def first_partial(redis, job_id: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while not (partials := [e.text for e in await reply_events(redis, "local", job_id) if e.kind == "partial"]):
        assert time.monotonic() < deadline, "no partial answer"
        await asyncio.sleep(0.01)
    return partials[0]


async def test_stop_ends_the_answer_at_the_next_step_keeping_what_was_shown(redis, tiny_model):
    settings = tiny_settings(model={"batch_size": 2, "max_prompt_tokens": 100}, generation={"max_new_tokens": 400})
    intake = Intake(redis, settings.limits)
    async with running_worker(redis, slow_engine(tiny_model, settings), settings):
        long = await intake.submit(CHAT, "m1", "Write a long answer.", author_id="alice")
        shown = await first_partial(redis, long.job_id)
        with pytest.raises(RejectedMessage, match=re.escape(NOT_YOURS)):
            await request_stop(redis, long.job_id, by="mallory")
        asked_at = time.monotonic()
        assert await request_stop(redis, long.job_id, by="alice") == STOPPING
        stopped = await final_event(redis, "local", long.job_id)
        assert time.monotonic() - asked_at < 20 * STEP_S + 1  # a step or two, not the 8 s the whole answer takes
        assert stopped.kind == "final" and stopped.text.startswith(shown) and stopped.text.endswith(STOPPED_NOTE)
        [exchange] = await history.load_exchanges(redis, CHAT.key)
        assert exchange.assistant.text == stopped.text.removesuffix(STOPPED_NOTE).strip()  # what was shown, no note
        assert await request_stop(redis, long.job_id, by="alice") == ALREADY_FINISHED
        # The slot is free: the next message is answered in full.
        after = await intake.submit(CHAT, "m2", "Thanks.", author_id="alice")
        assert (await final_event(redis, "local", after.job_id)).kind == "final"


async def test_an_admin_may_stop_anyones_answer_even_before_it_begins(redis, tiny_model):
    settings = tiny_settings(model={"max_prompt_tokens": 100}, generation={"max_new_tokens": 400})
    job = await Intake(redis, settings.limits).submit(CHAT, "m1", "Write a long answer.", author_id="alice")
    assert await request_stop(redis, job.job_id, by="admin", admin=True) == STOPPING  # still queued
    async with running_worker(redis, slow_engine(tiny_model, settings), settings):
        stopped = await final_event(redis, "local", job.job_id)
    assert (stopped.kind, stopped.text) == ("final", STOPPED_BEFORE_ANSWER) or stopped.text.endswith(STOPPED_NOTE)


async def test_regenerate_replaces_the_latest_answer_once_and_only_for_its_asker(redis, tiny_model):
    settings = tiny_settings(generation={"do_sample": True, "temperature": 1.5})
    intake = Intake(redis, settings.limits)
    async with running_worker(redis, slow_engine(tiny_model, settings), settings):
        first = await intake.submit(CHAT, "m1", "Tell me a story.", author="Alice", author_id="alice")
        await final_event(redis, "local", first.job_id)
        second = await intake.submit(CHAT, "m2", "Another one.", author="Alice", author_id="alice")
        await final_event(redis, "local", second.job_id)
        await redis.set(keys.posted(second.job_id), json.dumps(["msg-1"]))  # as its adapter recorded it

        with pytest.raises(RejectedMessage, match=ONLY_THE_LATEST):
            await intake.regenerate(CHAT, first.job_id, "click-0", by="alice")
        with pytest.raises(RejectedMessage, match=re.escape(NOT_YOURS)):
            await intake.regenerate(CHAT, second.job_id, "click-1", by="bob")
        again = await intake.regenerate(CHAT, second.job_id, "click-2", by="alice")
        assert (await intake.regenerate(CHAT, second.job_id, "click-2", by="alice")).duplicate  # a retried click
        assert await redis.get(keys.posted(again.job_id)) == json.dumps(["msg-1"])  # edits the old answer's message
        regenerated = await final_event(redis, "local", again.job_id)
        assert regenerated.kind == "final"

        exchanges = await history.load_exchanges(redis, CHAT.key)
        assert [e.user.text for e in exchanges] == ["Alice: Tell me a story.", "Alice: Another one."]  # asked once, named once
        assert exchanges[-1].assistant.job == again.job_id and exchanges[-1].assistant.text == regenerated.text
        assert exchanges[-1].user.author_id == "alice" and exchanges[-1].user.name == "Alice"
        # An admin may regenerate the new latest answer; the old one is gone for good.
        by_admin = await intake.regenerate(CHAT, again.job_id, "click-3", by="admin", admin=True)
        assert (await final_event(redis, "local", by_admin.job_id)).kind == "final"
        with pytest.raises(RejectedMessage, match=ONLY_THE_LATEST):
            await intake.regenerate(CHAT, second.job_id, "click-4", by="alice")
    assert len(await history.load_exchanges(redis, CHAT.key)) == 2
    assert [e.kind for e in await reply_events(redis, "local", "local:regenerate:click-2")].count("final") == 1


async def test_a_regeneration_counts_against_the_askers_limits(redis, tiny_model):
    settings = tiny_settings(limits={"messages_per_minute_per_author": 2})
    intake = Intake(redis, LimitSettings(messages_per_minute_per_author=2))
    async with running_worker(redis, slow_engine(tiny_model, settings), settings):
        first = await intake.submit(CHAT, "m1", "Hello", author_id="alice")
        await final_event(redis, "local", first.job_id)
        again = await intake.regenerate(CHAT, first.job_id, "click-1", by="alice")
        await final_event(redis, "local", again.job_id)
        with pytest.raises(RejectedMessage, match="faster than 2 a minute"):
            await intake.regenerate(CHAT, again.job_id, "click-2", by="alice")


async def test_a_regeneration_overtaken_by_a_reset_is_answered_with_a_sentence(redis, tiny_model):
    settings = tiny_settings()
    intake = Intake(redis, settings.limits)
    first = await intake.submit(CHAT, "m1", "Hello", author_id="alice")
    async with running_worker(redis, slow_engine(tiny_model, settings), settings) as live:
        await final_event(redis, "local", first.job_id)
        live.stop()
    again = await intake.regenerate(CHAT, first.job_id, "click-1", by="alice")
    await history.reset(redis, CHAT.key)
    async with running_worker(redis, slow_engine(tiny_model, settings), settings):
        told = await final_event(redis, "local", again.job_id)
    assert (told.kind, told.text) == ("error", ONLY_THE_LATEST) and not await history.load_exchanges(redis, CHAT.key)
