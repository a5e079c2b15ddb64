"""Continuous batching: slots joining and leaving at different steps, each getting what it would get alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from contract.jobs import Conversation
from engine.prompts import PromptBuilder
from engine.serving.prefix_store import PrefixStore
from engine.serving.scheduler import Scheduler, Slot
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


def converse(engine: TransformersEngine, questions: list[list[int]], turns: int, new_tokens: int) -> list[list[list[int]]]:
    """Several conversations, turn after turn, each prompt the previous prompt and answer plus the next question.

    Every turn admits all conversations through a scheduler with fewer slots than conversations, so
    slots join and leave. Returns each turn's prompts and answers.
    """
    prompts = [list(question) for question in questions]
    turns_seen = []
    for turn in range(turns):
        outputs, _ = run_staggered(Scheduler(engine, max_new_tokens=new_tokens), prompts)
        answers = [outputs[index] for index in range(len(prompts))]
        turns_seen.append([prompts, answers])
        prompts = [p + a + q[-(turn + 3):] for p, a, q in zip(prompts, answers, questions)]
    return turns_seen


@pytest.mark.parametrize("model_name", ["tiny", "smollm2"])
def test_prefix_cache_reuses_conversations_and_changes_no_token(request, model_name):
    if model_name == "tiny":
        loaded = request.getfixturevalue("tiny_model")
        model, tokenizer, sequence_length = loaded.model, loaded.tokenizer, 512
    else:
        request.getfixturevalue("smollm2_path")
        settings = tiny_settings(model={"id": "embedded:smollm2", "sequence_length": 2048, "max_prompt_tokens": 1024})
        loaded = TransformersEngine.load(settings.model, settings.generation)
        model, tokenizer, sequence_length = loaded.model, loaded.tokenizer, 2048
    generation = GenerationSettings(do_sample=False, max_new_tokens=10)
    cached = TransformersEngine(model, tokenizer, sequence_length, 2, generation, prefix_cache_mb=64)
    uncached = TransformersEngine(model, tokenizer, sequence_length, 2, generation)
    questions = prompts_for(cached, QUESTIONS[1:4])  # one system prompt: every first turn shares a prefix too
    with_cache = converse(cached, questions, turns=3, new_tokens=10)
    assert with_cache == converse(uncached, questions, turns=3, new_tokens=10)
    for prompts, answers in with_cache:
        for prompt, answer in zip(prompts, answers):
            assert answer == generate_alone(cached, prompt, 10)
    store = cached.prefix_cache
    # The first turn's first two prompts fill both slots before anything ended: all the others reuse something.
    assert store.queries == 9 and store.hits == 7
    # From the second turn on, each prompt reuses at least its whole previous prompt.
    assert store.reused_tokens >= sum(len(prompt) for prompts, _ in with_cache[:2] for prompt in prompts)
    assert 0 < store.size <= 64 * 2**20


def test_prefix_store_keeps_the_most_recently_used_within_its_budget():
    def kv(tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.zeros(1, tokens, 2), torch.zeros(1, tokens, 2))]  # 16 bytes a token

    store = PrefixStore(budget_bytes=16 * 9)
    store.add([1, 2, 3, 4], kv(4))
    store.add([5, 6, 7], kv(3))
    assert store.longest_prefix([1, 2, 3, 9], most=3)[0] == 3  # [1, 2, 3, 4] is now the most recent
    store.add([8, 9, 10], kv(3))  # over budget: [5, 6, 7], least recently used, leaves
    assert store.longest_prefix([5, 6, 7, 1], most=3)[0] == 0
    assert store.longest_prefix([1, 2, 3, 4, 5], most=4)[0] == 4  # never more than asked: one token is left to run
    store.add([1, 2, 3, 4, 5, 6], kv(6))  # its prefix [1, 2, 3, 4] adds nothing and leaves
    assert store.size == 16 * 9
    store.add(list(range(11)), kv(11))  # larger than the whole budget: not kept
    assert store.size == 16 * 9


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


def test_a_prefill_that_failed_with_nothing_live_leaves_room_for_the_next(tiny_model):
    """Before: a batch of one whose prefill failed (a model server's 503) had room for nothing ever again: the
    prefills counted since the last decode step were never reset, as no step runs with nothing live."""

    class FailingOnce(type(tiny_model)):
        failures = 1

        def prefill_many(self, requests):
            if self.failures:
                self.failures -= 1
                return [RuntimeError("503")] * len(requests)
            return super().prefill_many(requests)

    settings = tiny_settings(model={"batch_size": 1})
    model = settings.model
    engine = FailingOnce(tiny_model.model, tiny_model.tokenizer, model.sequence_length, 1, settings.generation)
    scheduler = Scheduler(engine, 8)
    [failed] = scheduler.admit_many([(prompts_for(engine, QUESTIONS[:1])[0], "a")])
    assert isinstance(failed, RuntimeError) and scheduler.room() == 1
    assert isinstance(scheduler.admit(prompts_for(engine, QUESTIONS[:1])[0], "a"), Slot)


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
