"""Batched generation: several conversations at once give each the text it would get alone."""

from __future__ import annotations

import asyncio

from engine.backends.transformers_backend import TransformersBackend
from engine.jobs import Conversation
from engine.prompts import PromptBuilder
from engine.queue import JobQueue
from tests.conftest import reply_events, running_worker, tiny_settings

QUESTIONS = [
    "Hi!",
    "My favorite color is blue. My favorite fruit is strawberry.",
    "Name a fruit that is on my favorite colour, and explain why it has that colour in some detail.",
    "What is the colour of my favorite fruit ?",
]


async def final_texts(redis) -> dict[str, str]:
    events = await reply_events(redis, "local")
    return {e.job_id: e.text for e in events if e.kind == "final"}


def no_op(rows):
    return False


def test_batched_greedy_equals_unbatched(tiny_backend):
    settings = tiny_settings(generation={"max_new_tokens": 20})
    builder = PromptBuilder(tiny_backend.tokenizer, settings.system_prompt, settings.model.max_prompt_tokens)
    prompts = [builder.build([], q).ids for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: padding is exercised
    alone = [tiny_backend.generate([p], settings.generation, no_op)[0] for p in prompts]
    together = tiny_backend.generate(prompts, settings.generation, no_op)
    assert together == alone
    assert all(len(row) == 20 for row in together)


async def test_worker_fills_a_batch_from_different_conversations(redis, tiny_backend):
    settings = tiny_settings(model={"batch_size": 4})
    queue = JobQueue(redis)
    for n, question in enumerate(QUESTIONS):
        await queue.submit(Conversation(platform="local", channel=f"c{n}"), f"m{n}", question)
    await queue.submit(Conversation(platform="local", channel="c0"), "later", "and a second message in c0")
    backend = TransformersBackend(tiny_backend.model, tiny_backend.tokenizer, 512, batch_size=4)
    calls = []

    def recording(prompts, generation, on_step):
        calls.append(len(prompts))
        return TransformersBackend.generate(backend, prompts, generation, on_step)

    backend.generate = recording
    async with running_worker(redis, backend, settings):
        while len(finals := await final_texts(redis)) < len(QUESTIONS) + 1:
            await asyncio.sleep(0.05)
    assert calls == [4, 1]  # c0's second message waits for its first: never two of one conversation
    builder = PromptBuilder(tiny_backend.tokenizer, settings.system_prompt, settings.model.max_prompt_tokens)
    for n, question in enumerate(QUESTIONS):
        [alone] = tiny_backend.generate([builder.build([], question).ids], settings.generation, no_op)
        assert finals[f"local:m{n}"] == tiny_backend.tokenizer.decode(alone, skip_special_tokens=True).strip()
