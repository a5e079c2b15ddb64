"""Slots and admission: which prompts enter the batch, which sequences leave it, one model step at a time.

Modelled on optimum-neuron's vLLM runner: a fixed table of slots, a new prompt takes the first
free one, a sequence leaves the moment it ends and its slot is reused by the next prompt.
The caller decides what a sequence is for: each slot carries the caller's `payload`, of its own type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from engine.serving.engine import Engine

Admission = Literal["continuous", "whole_batch"]
P = TypeVar("P")


class OutOfContext(ValueError):
    """The prompt leaves no room for even one new token."""


def clamp_new_tokens(prompt_tokens: int, requested: int, sequence_length: int) -> int:
    """Prompt + output never exceed the (compiled) sequence length."""
    room = sequence_length - prompt_tokens
    if room < 1:
        raise OutOfContext(f"prompt of {prompt_tokens} tokens fills the {sequence_length}-token context")
    return min(requested, room)


@dataclass
class Slot(Generic[P]):
    index: int
    payload: P
    limit: int  # most new tokens this sequence may have
    tokens: list[int] = field(default_factory=list)  # the output so far, end-of-turn token excluded
    ended: bool = False


class Scheduler(Generic[P]):
    def __init__(self, engine: Engine, max_new_tokens: int, admission: Admission = "continuous", max_prefills_per_step: int = 1):
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.admission = admission
        self.max_prefills_per_step = max_prefills_per_step
        self.slots: list[Slot[P] | None] = [None] * engine.batch_size
        self._prefills_since_step = 0

    @property
    def live(self) -> list[Slot[P]]:
        return [slot for slot in self.slots if slot is not None]

    def room(self) -> int:
        """How many new prompts may be admitted before the next decode step."""
        free = self.slots.count(None)
        if self.admission == "whole_batch":
            return free if free == len(self.slots) else 0
        if not self.live:  # no decode step to make room for: prefills that failed or ended at once do not count
            self._prefills_since_step = 0
        return min(free, self.max_prefills_per_step - self._prefills_since_step)

    def room_after_step(self) -> int:
        """How many prompts the next turn may admit at least, whatever this step ends (claimed during the step)."""
        if self.admission == "whole_batch":
            return 0  # a batch still runs; once it has ended, room() says so
        return min(self.slots.count(None), self.max_prefills_per_step)

    def admit(self, prompt: list[int], payload: P) -> Slot[P]:
        """Prefill `prompt` into the first free slot; the returned slot holds its first token (or has ended)."""
        [admitted] = self.admit_many([(prompt, payload)])
        if isinstance(admitted, Exception):
            raise admitted
        return admitted

    def admit_many(self, requests: list[tuple[list[int], P]]) -> list[Slot[P] | Exception]:
        """Prefill each prompt into a free slot, together: each slot (holding its first token, or ended), or why not."""
        results: list[Slot[P] | Exception] = []
        taken: list[tuple[int, Slot[P], list[int]]] = []  # position in results, slot, prompt
        for prompt, payload in requests:
            try:
                limit = clamp_new_tokens(len(prompt), self.max_new_tokens, self.engine.sequence_length)
            except OutOfContext as error:
                results.append(error)
                continue
            slot = Slot(self.slots.index(None), payload, limit)
            self.slots[slot.index] = slot
            self._prefills_since_step += 1
            taken.append((len(results), slot, prompt))
            results.append(slot)
        try:
            firsts = self.engine.prefill_many([(slot.index, prompt) for _, slot, prompt in taken])
        except BaseException:
            for _, slot, _ in taken:
                self.free(slot)
            raise
        for (position, slot, _), first in zip(taken, firsts):
            if isinstance(first, Exception):
                self.free(slot)
                results[position] = first
            elif first is not None:
                self._advance(slot, first)
        return results

    def step(self) -> list[Slot[P]]:
        """One decode step for every live slot; returns the slots whose sequences ended (already freed)."""
        live = self.live
        self._prefills_since_step = 0
        if not live:
            return []
        for slot, token in zip(live, self.engine.decode([slot.index for slot in live])):
            if token is not None:
                self._advance(slot, token)
        return [slot for slot in live if slot.ended]

    def free(self, slot: Slot[P]) -> None:
        """Take a sequence out of the batch, ended or not (its job was handed back or taken over)."""
        if self.slots[slot.index] is slot:
            self.slots[slot.index] = None
            self.engine.release(slot.index)

    def _advance(self, slot: Slot[P], token: int) -> None:
        if token in self.engine.end_ids:
            slot.ended = True
        else:
            slot.tokens.append(token)
            slot.ended = len(slot.tokens) >= slot.limit
        if slot.ended:
            self.free(slot)
