"""Reasoning models' thinking: the text some models write between <think> and </think> before their answer.

Users see, and history keeps, only the answer. The split works on decoded text, not on tokens:
a marker may take several tokens, and which ones differs from one tokenizer to the next.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

OPEN = "<think>"
CLOSE = "</think>"

# "undecided": the output so far may still become the start of a think block (nothing to show yet);
# "thinking": inside a think block that has not closed; "answer": the answer, which may be empty so far.
State = Literal["undecided", "thinking", "answer"]


class Reasoning(NamedTuple):
    thinking: str  # the thought, without its markers
    answer: str  # what the user sees, without leading whitespace
    state: State


def split_reasoning(text: str, done: bool = False) -> Reasoning:
    """Split a model's decoded output so far into its thinking and its answer.

    Output that starts (after whitespace) with <think> is thinking until </think>, and the answer is
    what follows; any other output is all answer. Until `done` (the sequence has ended), output that
    is still a beginning of <think> ("<thi") is undecided: it may yet become a think block. Once done,
    a think block that never closed stays "thinking": the model ran out of room before it answered.
    """
    body = text.lstrip()
    if not body.startswith(OPEN):
        if not done and OPEN.startswith(body):
            return Reasoning("", "", "undecided")
        return Reasoning("", body, "answer")
    thought, closed, rest = body[len(OPEN):].partition(CLOSE)
    if closed:
        return Reasoning(thought.strip(), rest.lstrip(), "answer")
    return Reasoning(_without_partial_close(thought).strip(), "", "thinking")


def _without_partial_close(thought: str) -> str:
    """An open block's text without the start of a </think> that its last tokens may be writing ("</thi")."""
    for length in range(len(CLOSE) - 1, 0, -1):
        if thought.endswith(CLOSE[:length]):
            return thought[:-length]
    return thought
