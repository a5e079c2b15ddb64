"""Stop and regenerate, through the real worker, the tiny model and Redis (the platforms' buttons are in their own tests)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass

import pytest

from bot.delivery import Delivery
from contract import history, keys
from contract.controls import (
    ALREADY_FINISHED,
    NOT_YOURS,
    ONLY_THE_LATEST,
    REGENERATION_STOPPED,
    STOPPING,
    WAIT_FOR_QUEUED,
    request_stop,
)
from contract.erasure import forget_user
from contract.intake import Intake
from contract.jobs import Conversation, RejectedMessage, Submitted
from contract.usage import day
from engine.serving.engine import EngineRequestFailed
from engine.serving.transformers_engine import TransformersEngine
from engine.worker import MODEL_FAILED, STOPPED_BEFORE_ANSWER, STOPPED_NOTE
from service.config import LimitSettings
from service.tasks import cancel_until_done
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

        with pytest.raises(RejectedMessage, match=ONLY_THE_LATEST):
            await intake.regenerate(CHAT, first.job_id, "click-0", by="alice")
        with pytest.raises(RejectedMessage, match=re.escape(NOT_YOURS)):
            await intake.regenerate(CHAT, second.job_id, "click-1", by="bob")
        again = await intake.regenerate(CHAT, second.job_id, "click-2", by="alice")
        assert (await intake.regenerate(CHAT, second.job_id, "click-2", by="alice")).duplicate  # a retried click
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


class Recording:
    """A platform's messages as a person sees them: message id -> text, and which job each shows."""

    limit = 2000
    settles = False

    def refused(self, error: Exception) -> bool:
        return False  # what these tests make fail is a passing failure (a 5xx, an internal_error)

    def __init__(self):
        self.messages: dict[str, str] = {}
        self.jobs: dict[str, str] = {}
        self.shown: list[tuple[str, str]] = []  # (message id, job) of every post and edit, in order
        self.posted = 0

    async def post(self, part) -> str:
        self.posted += 1
        message_id = f"msg-{self.posted}"
        self.show(message_id, part)
        return message_id

    async def edit(self, message_id, part) -> None:
        self.show(message_id, part)

    def show(self, message_id, part) -> None:
        self.messages[message_id], self.jobs[message_id] = part.text, part.job_id
        self.shown.append((message_id, part.job_id))

    async def remove(self, message_id, reply_to) -> None:
        del self.messages[message_id], self.jobs[message_id]


@contextlib.asynccontextmanager
async def delivering(redis, outbox: Recording):
    """The real Delivery of an adapter process, for the local platform, into `outbox`."""
    delivery = Delivery(redis, "local", outbox, edit_interval_s=0.0, lease_s=0.6, holder="adapter")
    task = asyncio.create_task(delivery.run())
    try:
        yield delivery
    finally:
        await cancel_until_done([task])


async def shown(outbox: Recording, expected: dict[str, str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while outbox.messages != expected:
        assert time.monotonic() < deadline, f"shown {outbox.messages}, expected {expected}"
        await asyncio.sleep(0.02)


async def stored_answer(redis, job_id: str, timeout: float = 20) -> str:
    """The answer of job `job_id` once the history holds it (reply events are trimmed once an adapter has them)."""
    deadline = time.monotonic() + timeout
    while not (answers := [e.assistant.text for e in await history.load_exchanges(redis, CHAT.key) if e.assistant.job == job_id]):
        assert time.monotonic() < deadline, f"{job_id} not answered within {timeout:g} s"
        await asyncio.sleep(0.02)
    return answers[0]


async def answered_and_shown(redis, outbox, intake, message_id: str, text: str) -> tuple[str, str]:
    """A question answered and shown; its job id and the answer's text."""
    job = await intake.submit(CHAT, message_id, text, author_id="alice")
    answer = await stored_answer(redis, job.job_id)
    deadline = time.monotonic() + 20
    while answer not in outbox.messages.values():
        assert time.monotonic() < deadline, "answer not shown"
        await asyncio.sleep(0.02)
    return job.job_id, answer


@dataclass
class Regenerating:
    intake: Intake
    outbox: Recording
    first: str  # the answer's job
    old: str  # its text
    again: Submitted  # its regeneration, queued


@contextlib.asynccontextmanager
async def an_answer_to_regenerate(redis, tiny_model, settings):
    """An answer shown through a running Delivery, then its regeneration queued while no worker runs."""
    intake, outbox = Intake(redis, settings.limits), Recording()
    async with delivering(redis, outbox):
        async with running_worker(redis, slow_engine(tiny_model, settings), settings):
            first, old = await answered_and_shown(redis, outbox, intake, "m1", "Hello")
        yield Regenerating(intake, outbox, first, old, await intake.regenerate(CHAT, first, "click-1", by="alice"))


async def test_regenerate_is_refused_while_the_conversation_has_messages_waiting(redis, tiny_model):
    """Before: a second click queued a second regeneration, whose refusal replaced the first one's answer."""
    settings = tiny_settings()
    async with an_answer_to_regenerate(redis, tiny_model, settings) as case:
        intake, outbox, first, again = case.intake, case.outbox, case.first, case.again
        with pytest.raises(RejectedMessage, match=re.escape(WAIT_FOR_QUEUED)):
            await intake.regenerate(CHAT, first, "click-2", by="alice")  # clicked twice before it is answered
        await intake.submit(CHAT, "m2", "And then?", author_id="alice")
        with pytest.raises(RejectedMessage, match=re.escape(WAIT_FOR_QUEUED)):
            await intake.regenerate(CHAT, first, "click-3", by="alice")  # a newer message is queued
        async with running_worker(redis, slow_engine(tiny_model, settings), settings):
            regenerated = await stored_answer(redis, again.job_id)
            follow_up = await stored_answer(redis, "local:m2")
            await shown(outbox, {"msg-1": regenerated, "msg-2": follow_up})
    assert outbox.jobs["msg-1"] == again.job_id  # the old answer's message, edited in place


@pytest.mark.parametrize("overtaken_by", ["reset", "forget-user", "stop"])
async def test_a_regeneration_that_brings_no_answer_leaves_the_old_one_and_says_why_apart(redis, tiny_model, overtaken_by):
    """Before: the refusal (or "stopped before the answer began") replaced the old answer's message, and after a
    stop the history no longer held the job its new Regenerate button named."""
    settings = tiny_settings()
    async with an_answer_to_regenerate(redis, tiny_model, settings) as case:
        intake, outbox, first, old, again = case.intake, case.outbox, case.first, case.old, case.again
        if overtaken_by == "reset":
            await history.reset(redis, CHAT.key)
        elif overtaken_by == "forget-user":
            await forget_user(redis, "local", "alice")
        else:
            await request_stop(redis, again.job_id, by="alice")
        async with running_worker(redis, slow_engine(tiny_model, settings), settings):
            note = await final_event(redis, "local", again.job_id)
            assert note.kind == "error" and note.replaces == first
            await shown(outbox, {"msg-1": old, "msg-2": note.text})
        assert outbox.jobs["msg-1"] == first  # its buttons still name the answer they regenerate
        if overtaken_by == "stop":
            assert note.text == REGENERATION_STOPPED
            [kept] = await history.load_exchanges(redis, CHAT.key)
            assert (kept.assistant.job, kept.assistant.text) == (first, old)
            later = await intake.regenerate(CHAT, first, "click-2", by="alice")  # the old answer's button still works
            async with running_worker(redis, slow_engine(tiny_model, settings), settings):
                replaced = await stored_answer(redis, later.job_id)
                await shown(outbox, {"msg-1": replaced, "msg-2": note.text})


class FailingAfter(SlowEngine):
    """The tiny model, whose requests fail mid-answer once `fail_after` steps have run (a model server sending a
    stream that cannot be read: the request's fault, not the server's)."""

    fail_after: int | None = None

    def decode(self, slots: list[int]) -> list[int]:
        if self.fail_after is not None:
            self.fail_after -= 1
            if self.fail_after < 0:
                raise EngineRequestFailed("the request failed", slots[0], server_fault=False)
        return super().decode(slots)


async def test_a_regeneration_that_fails_midway_shows_the_old_answer_again(redis, tiny_model):
    settings = tiny_settings(generation={"max_new_tokens": 200})
    intake, outbox = Intake(redis, settings.limits), Recording()
    model = settings.model
    engine = FailingAfter(tiny_model.model, tiny_model.tokenizer, model.sequence_length, model.batch_size, settings.generation)
    async with delivering(redis, outbox), running_worker(redis, engine, settings):
        first, old = await answered_and_shown(redis, outbox, intake, "m1", "Hello")
        engine.fail_after = 20
        again = await intake.regenerate(CHAT, first, "click-1", by="alice")
        note = await final_event(redis, "local", again.job_id)
        assert (note.kind, note.text) == ("error", MODEL_FAILED)
        await shown(outbox, {"msg-1": old, "msg-2": MODEL_FAILED})
    assert ("msg-1", again.job_id) in outbox.shown  # it had begun to stream over the old answer
    assert outbox.jobs["msg-1"] == first
    [kept] = await history.load_exchanges(redis, CHAT.key)
    assert kept.assistant.job == first


async def test_a_message_stopped_while_queued_is_never_run(redis, tiny_model):
    """Before: a follow-up stopped in the queue (Slack's Stop stops the whole thread) was still run, its first
    text shown and a fragment stored as its answer."""
    settings = tiny_settings(generation={"max_new_tokens": 400})
    engine = slow_engine(tiny_model, settings)
    intake = Intake(redis, settings.limits)
    job = await intake.submit(CHAT, "m1", "Write a long answer.", author_id="alice")
    await request_stop(redis, job.job_id, by="alice")
    async with running_worker(redis, engine, settings):
        stopped = await final_event(redis, "local", job.job_id)
        after = await intake.submit(CHAT, "m2", "Hello", author_id="alice")
        await final_event(redis, "local", after.job_id)
    assert (stopped.kind, stopped.text) == ("final", STOPPED_BEFORE_ANSWER)
    assert [e.kind for e in await reply_events(redis, "local", job.job_id)] == ["final"]  # nothing streamed
    [exchange] = await history.load_exchanges(redis, CHAT.key)  # only the second message's
    assert exchange.assistant.job == after.job_id
    assert await redis.hget(keys.usage_day(day()) + "author:messages", "local:alice") == "1"  # the stopped one is not charged
