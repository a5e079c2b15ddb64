"""Continuous batching: slots joining and leaving at different steps, each getting what it would get alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from contract.jobs import Conversation
from engine.prompts import PromptBuilder
from engine.serving.scheduler import Scheduler
from engine.serving.transformers_engine import TransformersEngine
from service.config import GenerationSettings
from tests.conftest import Queues, engine_for, reply_events, run_staggered, running_worker, tiny_settings

QUESTIONS = [
    "Hi!",
    "My favorite color is blue. My favorite fruit is strawberry.",
    "Name a fruit that is on my favorite colour, and explain why it has that colour in some detail.",
    "What is the colour of my favorite fruit ?",
    "And the sky?",
]


def generate_alone(engine: TransformersEngine, prompt: list[int], new_tokens: int) -> list[int]:
    """model.generate on one prompt, greedy: the reference every slot must match token for token."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        output = engine.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
            eos_token_id=sorted(engine.end_ids), pad_token_id=min(engine.end_ids),
        )
    tokens = output[0, len(prompt):].tolist()
    return tokens[: tokens.index(2)] if 2 in tokens else tokens


def prompts_for(engine, questions) -> list[list[int]]:
    builder = PromptBuilder(engine.tokenizer, tiny_settings().system_prompt, 384)
    return [builder.build([], question).ids for question in questions]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_slots_joining_and_leaving_equal_generate_alone(tiny_model, batch_size):
    settings = tiny_settings(model={"batch_size": batch_size}, generation={"max_new_tokens": 20})
    engine = engine_for(tiny_model, settings)
    prompts = prompts_for(engine, QUESTIONS)
    assert len({len(p) for p in prompts}) == len(prompts)  # rows of different lengths share the cache
    # A context just longer than the longest prompt gives every sequence its own limit, so they
    # leave at different steps and later prompts join the ones still running.
    engine.sequence_length = max(map(len, prompts)) + 3
    limits = [min(20, engine.sequence_length - len(p)) for p in prompts]
    assert len(set(limits)) > 2
    outputs, admitted = run_staggered(Scheduler(engine, max_new_tokens=20), prompts)
    for index, prompt in enumerate(prompts):
        assert outputs[index] == generate_alone(engine, prompt, limits[index]), f"prompt {index}"
        assert len(prompt) + len(outputs[index]) <= engine.sequence_length
    assert all(len(step) <= 1 for step in admitted)  # one prefill between two decode steps
    if batch_size > 1:
        assert sum(1 for step in admitted if step) == len(prompts)
        assert admitted.index([4]) < limits[0]  # the last prompt joined while the first was still generating
    assert not engine._histories  # every slot released


def test_free_slots_between_live_ones_and_longer_lines_left_behind_change_nothing(tiny_model):
    engine = engine_for(tiny_model, tiny_settings(model={"batch_size": 3}, generation={"max_new_tokens": 12}))
    long_prompt, short_prompt, other = prompts_for(engine, [QUESTIONS[2], QUESTIONS[4], QUESTIONS[1]])
    assert len(long_prompt) > len(short_prompt) + 12
    engine.prefill(1, long_prompt)
    engine.release(1)  # slot 1's line keeps the long prompt's keys beyond where the short one ends
    outputs = {0: [engine.prefill(0, other)], 2: [engine.prefill(2, long_prompt)]}  # slot 1 rides along, free
    outputs[1] = [engine.prefill(1, short_prompt)]
    for _ in range(11):
        for slot, token in zip([2, 0, 1], engine.decode([2, 0, 1])):
            outputs[slot].append(token)
    for slot, prompt in [(0, other), (1, short_prompt), (2, long_prompt)]:
        tokens = outputs[slot]
        assert (tokens[: tokens.index(2)] if 2 in tokens else tokens) == generate_alone(engine, prompt, 12), f"slot {slot}"


def test_smollm2_slots_equal_generate_alone_in_float32(smollm2_path):
    settings = tiny_settings(
        model={"id": "embedded:smollm2", "batch_size": 2, "sequence_length": 2048, "max_prompt_tokens": 1024},
        generation={"max_new_tokens": 12},
    )
    engine = TransformersEngine.load(settings.model, settings.generation)
    prompts = prompts_for(engine, QUESTIONS[1:4])
    outputs, _ = run_staggered(Scheduler(engine, max_new_tokens=12), prompts)
    for index, prompt in enumerate(prompts):
        assert outputs[index] == generate_alone(engine, prompt, 12)
        assert outputs[index]  # a real model answers


def test_repetition_penalty_and_sampling_come_from_transformers_processors(tiny_model):
    settings = tiny_settings(model={"batch_size": 2}, generation={"max_new_tokens": 16, "repetition_penalty": 1.3})
    engine = engine_for(tiny_model, settings)
    prompt = prompts_for(engine, QUESTIONS[:1])[0]
    [penalised] = run_staggered(Scheduler(engine, 16), [prompt])[0].values()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        reference = engine.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
            repetition_penalty=1.3, eos_token_id=[2], pad_token_id=2,
        )[0, len(prompt):].tolist()
    assert penalised == reference[: reference.index(2)] if 2 in reference else penalised == reference
    sampled = GenerationSettings(do_sample=True, temperature=0.8, top_k=5, top_p=0.9, max_new_tokens=16)
    sampling_engine = engine_for(tiny_model, settings.model_copy(update={"generation": sampled}))
    torch.manual_seed(0)
    logits = torch.randn(2, sampling_engine.model.config.vocab_size)
    picks = {tuple(sampling_engine.sampler(logits, [[1], [1]])) for _ in range(20)}
    allowed = [set(logits[row].topk(5).indices.tolist()) for row in range(2)]
    assert all(a in allowed[0] and b in allowed[1] for a, b in picks)  # top-k holds per row
    assert len(picks) > 1  # and it samples


def test_decode_must_advance_every_live_slot(tiny_model):
    engine = engine_for(tiny_model, tiny_settings(model={"batch_size": 2}))
    prompts = prompts_for(engine, QUESTIONS[:2])
    engine.prefill(0, prompts[0])
    engine.prefill(1, prompts[1])
    with pytest.raises(ValueError, match="every live slot"):
        engine.decode([0])


# --- the worker -------------------------------------------------------------------------------------


def long_and_short(engine) -> tuple[str, str]:
    """A question with a long answer (short prompt) and one with a short answer (a prompt near the context)."""
    builder = PromptBuilder(engine.tokenizer, tiny_settings().system_prompt, 480)
    short_answer = "word " * 430
    assert 460 <= len(builder.build([], short_answer).ids) <= 480  # leaves 512 - 480 = 32 tokens at most
    return "Tell me everything.", short_answer


async def answer_order(redis, tiny_model, admission: str) -> list[str]:
    settings = tiny_settings(
        model={"batch_size": 2, "sequence_length": 512, "max_prompt_tokens": 480, "admission": admission},
        generation={"max_new_tokens": 300},
    )
    engine = engine_for(tiny_model, settings)
    long_question, short_question = long_and_short(engine)
    queue = Queues(redis)
    await queue.submit(Conversation(platform="local", channel="long"), "long", long_question)
    await queue.submit(Conversation(platform="local", channel="short"), "short", short_question)
    async with running_worker(redis, engine, settings):
        async def finals() -> list[str]:
            later_sent = False
            while True:
                done = [e.job_id for e in await reply_events(redis, "local") if e.kind == "final"]
                if "local:short" in done and not later_sent:
                    # A new message arrives while the long answer is still being written.
                    await queue.submit(Conversation(platform="local", channel="later"), "later", short_question)
                    later_sent = True
                if len(done) == 3:
                    return done
                await asyncio.sleep(0.005)

        return await asyncio.wait_for(finals(), 60)


async def test_an_answer_leaves_when_it_ends_and_a_new_message_joins_the_running_batch(redis, tiny_model):
    order = await answer_order(redis, tiny_model, "continuous")
    assert order == ["local:short", "local:later", "local:long"]


async def test_whole_batch_admission_makes_the_new_message_wait_for_the_long_answer(redis, tiny_model):
    order = await answer_order(redis, tiny_model, "whole_batch")
    assert order == ["local:short", "local:long", "local:later"]
