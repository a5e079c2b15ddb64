"""Reasoning models: the <think> block is never shown nor kept; the answer streams once thinking ends.

The worker runs for real over real Redis; the model is a scripted stand-in that writes, token by
token in the SmolLM2 tokenizer's tokens, what a reasoning model would.
"""

from __future__ import annotations

import copy
import logging

import pytest
from transformers import AutoTokenizer

from contract import history
from contract.jobs import Conversation
from engine.reasoning import Reasoning, split_reasoning
from engine.serving.engine import Engine
from engine.serving.scheduler import Slot
from engine.worker import THOUGHT_TOO_LONG, Answer, answer_so_far
from tests.conftest import Queues, final_event, reply_events, running_worker, tiny_settings

THOUGHT = "<think>The user asks 2+2. That is 4.</think>"
SCRIPTS = {  # the question a prompt ends with -> what the model writes
    "What is 2+2?": THOUGHT + "The answer is 4.",
    "And 3+3?": "<think>\nNow 3+3: six.\n</think>\n\nIt is 6.",
    "Say hello.": "Hello there!",
    "Think forever.": "<think>" + "Let me think about this a little more. " * 20 + "</think>Done.",
}


@pytest.mark.parametrize(
    ("text", "done", "expected"),
    [
        (THOUGHT + "The answer is 4.", False, ("The user asks 2+2. That is 4.", "The answer is 4.", "answer")),
        (" \n<think>\nhmm\n</think>\n\n  Four.", True, ("hmm", "Four.", "answer")),
        ("<think></think>Hi", False, ("", "Hi", "answer")),
        ("<think>a</think>", False, ("a", "", "answer")),  # closed; the answer has not begun
        ("<think>a</think>b</think>c", False, ("a", "b</think>c", "answer")),  # only the first block is thinking
        ("Four.", False, ("", "Four.", "answer")),
        ("<b>bold</b>", False, ("", "<b>bold</b>", "answer")),
        ("I said <think> then", False, ("", "I said <think> then", "answer")),  # not at the start: all answer
        ("<think>still going", False, ("still going", "", "thinking")),
        ("<think>still going", True, ("still going", "", "thinking")),  # ended inside the block
        ("<think>almost</thi", False, ("almost", "", "thinking")),
        ("<think>", False, ("", "", "thinking")),
        ("<thi", False, ("", "", "undecided")),  # may still become <think>: nothing to show
        ("  <", False, ("", "", "undecided")),
        ("", False, ("", "", "undecided")),
        ("<thi", True, ("", "<thi", "answer")),  # ended: it never became <think>
        ("", True, ("", "", "answer")),
    ],
)
def test_split_reasoning(text, done, expected):
    assert split_reasoning(text, done) == Reasoning(*expected)


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


def test_markers_spread_over_several_tokens_show_nothing_before_the_answer(tokenizer):
    tokens = tokenizer(THOUGHT + "The answer is 4.", add_special_tokens=False).input_ids
    assert len(tokenizer("<think>", add_special_tokens=False).input_ids) > 1  # "<", "think", ">" here
    answers = [split_reasoning(tokenizer.decode(tokens[:n])).answer for n in range(len(tokens) + 1)]
    closed = next(n for n in range(len(tokens) + 1) if "</think>" in tokenizer.decode(tokens[:n]))
    assert not any(answers[:closed + 1])
    assert all("The answer is 4.".startswith(answer) for answer in answers) and answers[-1] == "The answer is 4."


def test_a_long_thought_is_followed_by_its_newest_tokens_and_counted_exactly(tokenizer):
    """While a block is open the worker decodes only the newest tokens: the result is the full decode's."""
    thought = "<think>" + "Step by step, carefully. " * 40 + "</think>"
    tokens = tokenizer(thought + "Forty steps.", add_special_tokens=False).input_ids
    thinking = len(tokenizer(thought, add_special_tokens=False).input_ids)
    slot = Slot(0, Answer(job=None, prompt=None, suspect=False, claimed_at=0.0), limit=len(tokens))
    for n in range(1, len(tokens) + 1):
        slot.tokens = tokens[:n]
        seen = answer_so_far(tokenizer, slot)
        assert (seen.answer, seen.state != "answer") == (
            split_reasoning(tokenizer.decode(tokens[:n])).answer, n < thinking
        ), n
    assert slot.payload.thinking_tokens == thinking > 200
    assert answer_so_far(tokenizer, slot, done=True).answer == "Forty steps."


class ScriptedEngine(Engine):
    """A stand-in for a reasoning model (the Engine interface, none of our engines): a prompt gets the
    scripted output for the question it ends with, one token per step in each slot, then end of turn."""

    sequence_length = 2048

    def __init__(self, tokenizer, scripts: dict[str, str], batch_size: int):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.end_ids = frozenset({tokenizer.eos_token_id})
        self.scripts = {
            question: tokenizer(output, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            for question, output in scripts.items()
        }
        self.running: dict[int, list[int]] = {}  # slot -> the tokens it has still to write
        self.prompts: list[str] = []
        self.most_running = 0

    def prefill(self, slot: int, prompt: list[int]) -> int:
        assert slot not in self.running, f"prefill into slot {slot}, whose sequence was never released"
        assert 0 <= slot < self.batch_size
        text = self.tokenizer.decode(prompt)
        self.prompts.append(text)
        question = max(self.scripts, key=text.rfind)  # the latest question in the prompt
        assert question in text
        self.running[slot] = list(self.scripts[question])
        self.most_running = max(self.most_running, len(self.running))
        return self.running[slot].pop(0)

    def decode(self, slots: list[int]) -> list[int]:
        assert all(slot in self.running for slot in slots), f"decode of released slots: {slots} {self.running}"
        return [self.running[slot].pop(0) for slot in slots]

    def release(self, slot: int) -> None:
        del self.running[slot]  # releasing a slot that holds nothing is a bug in the caller


def conversation(name: str) -> Conversation:
    return Conversation(platform="local", channel=name)


async def test_a_reasoning_model_is_answered_without_its_thoughts(redis, tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="engine.worker")
    settings = tiny_settings(model={"batch_size": 3}, generation={"max_new_tokens": 40})
    engine = ScriptedEngine(tokenizer, SCRIPTS, batch_size=3)
    queue = Queues(redis)
    maths, endless, hello = conversation("maths"), conversation("endless"), conversation("hello")
    jobs = {
        "maths": await queue.submit(maths, "m1", "What is 2+2?"),
        "endless": await queue.submit(endless, "e1", "Think forever."),
        "hello": await queue.submit(hello, "h1", "Say hello."),
    }
    async with running_worker(redis, engine, settings):
        finals = {name: await final_event(redis, "local", submitted.job_id) for name, submitted in jobs.items()}
        assert engine.most_running == 3  # all three written at once, in their own slots
        follow_up = await queue.submit(maths, "m2", "And 3+3?")
        finals["follow-up"] = await final_event(redis, "local", follow_up.job_id)
        jobs["follow-up"] = follow_up
    assert engine.running == {}  # every slot released

    assert (finals["maths"].kind, finals["maths"].text) == ("final", "The answer is 4.")
    assert (finals["follow-up"].kind, finals["follow-up"].text) == ("final", "It is 6.")
    assert (finals["hello"].kind, finals["hello"].text) == ("final", "Hello there!")  # no think block: as before
    assert (finals["endless"].kind, finals["endless"].text) == ("error", THOUGHT_TOO_LONG)

    partials = {
        name: [event.text for event in await reply_events(redis, "local", submitted.job_id) if event.kind == "partial"]
        for name, submitted in jobs.items()
    }
    assert partials["endless"] == []  # the platform's waiting indicator stays until the error
    for name in ("maths", "follow-up", "hello"):
        assert partials[name], name  # the answer streams once the thinking has ended
        assert all(finals[name].text.startswith(text) for text in partials[name]), partials[name]
    for text in partials["maths"] + partials["follow-up"]:
        assert "think" not in text and "<" not in text and "user asks" not in text and "six" not in text

    [first, second] = await history.load_exchanges(redis, maths.key)
    assert [(e.user.text, e.assistant.text) for e in (first, second)] == [
        ("What is 2+2?", "The answer is 4."), ("And 3+3?", "It is 6.")
    ]
    assert await history.load_exchanges(redis, endless.key) == []
    follow_up_prompt = engine.prompts[-1]  # history in the next prompt holds only the answer
    assert "The answer is 4." in follow_up_prompt and "think" not in follow_up_prompt and "user asks" not in follow_up_prompt

    answered = {record.job: record for record in caplog.records if record.getMessage() == "job answered"}
    closed = len(tokenizer(THOUGHT, add_special_tokens=False).input_ids)
    assert answered[jobs["maths"].job_id].thinking_tokens == closed
    assert answered[jobs["hello"].job_id].thinking_tokens == 0
    assert jobs["endless"].job_id not in answered
    [warning] = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert warning.getMessage() == "the model was still thinking when its answer ended" and warning.thinking_tokens == 40


async def test_a_template_that_opens_the_think_block_itself(redis, tokenizer):
    """Templates of some reasoning models end the prompt with <think>: the output starts inside the block."""
    opening = copy.deepcopy(tokenizer)
    opening.chat_template = tokenizer.chat_template.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
    scripts = {"What is 2+2?": "The user asks 2+2. That is 4.</think>The answer is 4.", "Say hello.": "</think>Hello there!"}
    engine = ScriptedEngine(opening, scripts, batch_size=2)
    queue = Queues(redis)
    jobs = [await queue.submit(conversation("maths"), "m1", "What is 2+2?"), await queue.submit(conversation("hi"), "h1", "Say hello.")]
    async with running_worker(redis, engine, tiny_settings(model={"batch_size": 2}, generation={"max_new_tokens": 40})):
        finals = [await final_event(redis, "local", job.job_id) for job in jobs]
    assert all(prompt.rstrip().endswith("<think>") for prompt in engine.prompts)
    assert [(event.kind, event.text) for event in finals] == [("final", "The answer is 4."), ("final", "Hello there!")]
    for job, final in zip(jobs, finals):
        partials = [event.text for event in await reply_events(redis, "local", job.job_id) if event.kind == "partial"]
        assert all(final.text.startswith(text) and "2+2. That" not in text for text in partials)
    [exchange] = await history.load_exchanges(redis, "local:maths")
    assert exchange.assistant.text == "The answer is 4."
