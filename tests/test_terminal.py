"""The terminal chat, typed into through a pipe, against Redis and a real worker with the tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time

from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from bot.terminal import BOT, REPLACES, USER, YOU, chat
from contract import history
from contract.jobs import Conversation
from engine.worker import STOPPED_NOTE
from tests.conftest import final_event, reply_events, running_worker, tiny_settings
from tests.test_controls import slow_engine

TERMINAL = Conversation(platform="local", channel="terminal")
LIMIT_S = 60  # no test waits longer than this for anything


@contextlib.asynccontextmanager
async def terminal(redis, settings):
    """chat() running on a pipe: yields (type, transcript), where type(text) types lines and closes the pipe on None."""
    out = io.StringIO()
    with create_pipe_input() as keys:
        task = asyncio.create_task(chat(redis, settings, input=keys, output=DummyOutput(), out=out))

        def typing(text: str | None) -> None:
            keys.close() if text is None else keys.send_text(text)

        try:
            yield typing, out
        finally:
            keys.close()  # the input ends: chat() shows what was asked, then returns
            await asyncio.wait_for(task, LIMIT_S)


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + LIMIT_S
    while not await condition():
        assert time.monotonic() < deadline, f"waited {LIMIT_S} s for {what}"
        await asyncio.sleep(0.02)


async def answering(redis) -> None:
    """Until the worker has streamed part of an answer."""

    async def partial() -> bool:
        return any(event.kind == "partial" for event in await reply_events(redis, "local"))

    await until(partial, "a partial answer")


async def answers(redis) -> list[str]:
    """The answers in the history, each as the transcript shows it (its final event's text)."""
    exchanges = await history.load_exchanges(redis, TERMINAL.key)
    return [(await final_event(redis, "local", e.assistant.job, LIMIT_S)).text for e in exchanges]


def shown(question: str, answer: str) -> str:
    return f"{YOU}{question}\n{BOT}{answer}\n"


async def test_a_message_and_its_streamed_answer(redis, worker, settings):
    async with terminal(redis, settings) as (type_, out):
        type_("Hello there\n")
        type_(None)
    [exchange] = await history.load_exchanges(redis, TERMINAL.key)
    assert exchange.user.text == "Hello there" and exchange.user.author_id == USER
    assert out.getvalue().endswith(shown("Hello there", (await answers(redis))[0]))


async def test_stop_typed_while_the_answer_streams_ends_it(redis, tiny_model):
    settings = tiny_settings(model={"max_prompt_tokens": 100}, generation={"max_new_tokens": 400})
    async with running_worker(redis, slow_engine(tiny_model, settings), settings):
        async with terminal(redis, settings) as (type_, out):
            type_("Write a long answer.\n")
            await answering(redis)
            asked_at = time.monotonic()
            type_("/stop\n")
            type_(None)
        assert time.monotonic() - asked_at < 5  # a step or two, not the 8 s the whole answer takes
    [answer] = await answers(redis)
    assert answer.endswith(STOPPED_NOTE) and out.getvalue().endswith(f"{STOPPED_NOTE}\n")
    assert out.getvalue().endswith(shown("Write a long answer.", answer))


async def test_a_message_typed_while_an_answer_streams_is_answered_after_it(redis, tiny_model):
    settings = tiny_settings(generation={"max_new_tokens": 60})
    async with running_worker(redis, slow_engine(tiny_model, settings), settings):
        async with terminal(redis, settings) as (type_, out):
            type_("First question\n")
            await answering(redis)
            type_("Second question\n")
            type_(None)
    first, second = await answers(redis)
    assert out.getvalue().endswith(shown("First question", first) + shown("Second question", second))


async def test_regenerate_replaces_the_latest_answer(redis, tiny_model):
    settings = tiny_settings(generation={"do_sample": True, "temperature": 1.5})
    async with running_worker(redis, slow_engine(tiny_model, settings), settings):
        async with terminal(redis, settings) as (type_, out):
            type_("/regenerate\n")
            type_("Tell me a story.\n")

            async def printed() -> bool:
                return len(await history.load_exchanges(redis, TERMINAL.key)) == 1 and out.getvalue().endswith(
                    shown("Tell me a story.", (await answers(redis))[0])
                )

            await until(printed, "the first answer")
            type_("/regenerate\n")
            type_(None)
    [exchange] = await history.load_exchanges(redis, TERMINAL.key)
    assert exchange.user.text == "Tell me a story." and exchange.assistant.job.startswith("local:regenerate:")
    [answer] = await answers(redis)
    assert exchange.assistant.text == answer
    assert out.getvalue().endswith(f"{REPLACES}\n{BOT}{answer}\n")
    assert "(no answer to regenerate)" in out.getvalue()  # the /regenerate typed before anything was asked


async def test_reset_forgets_the_conversation(redis, worker, settings):
    async with terminal(redis, settings) as (type_, out):
        type_("My name is Ada.\n")

        async def remembered() -> bool:
            return bool(await history.load_exchanges(redis, TERMINAL.key))

        await until(remembered, "the answer")
        type_("/reset\n")

        async def forgotten() -> bool:
            return "(conversation forgotten)" in out.getvalue()

        await until(forgotten, "the reset")
        assert await history.load_exchanges(redis, TERMINAL.key) == []


async def test_quit_leaves_at_once_even_while_an_answer_streams(redis, tiny_model):
    settings = tiny_settings(model={"max_prompt_tokens": 100}, generation={"max_new_tokens": 400})
    async with running_worker(redis, slow_engine(tiny_model, settings), settings):
        out = io.StringIO()
        with create_pipe_input() as keys:
            task = asyncio.create_task(chat(redis, settings, input=keys, output=DummyOutput(), out=out))
            keys.send_text("Write a long answer.\n")
            await answering(redis)
            keys.send_text("/quit\n")  # the pipe stays open: only /quit ends the chat
            await asyncio.wait_for(task, 5)  # not the 8 s the whole answer takes
    assert f"{YOU}Write a long answer.\n" in out.getvalue() and STOPPED_NOTE not in out.getvalue()
