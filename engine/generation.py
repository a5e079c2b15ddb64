"""Backend-independent generation pieces: settings to kwargs, the per-step hook, limits.

The per-step hook is a `StoppingCriteria` because both transformers and optimum-neuron call
stopping criteria after every decoding step, while optimum-neuron ignores `streamer`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria

from engine.config import GenerationSettings

# Called after every step with, per row, the tokens generated so far (cut before end of turn).
# Returning True stops the whole batch now (the worker is shutting down).
StepCallback = Callable[[list[list[int]]], bool]


class OutOfContext(ValueError):
    """The prompt leaves no room for even one new token."""


def clamp_new_tokens(prompt_tokens: int, requested: int, sequence_length: int) -> int:
    """Prompt + output never exceed the (compiled) sequence length."""
    room = sequence_length - prompt_tokens
    if room < 1:
        raise OutOfContext(f"prompt of {prompt_tokens} tokens fills the {sequence_length}-token context")
    return min(requested, room)


def sampling_kwargs(settings: GenerationSettings) -> dict:
    if not settings.do_sample:
        return {"do_sample": False, "repetition_penalty": settings.repetition_penalty}
    return {
        "do_sample": True,
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
        "repetition_penalty": settings.repetition_penalty,
    }


def cut_at_end(tokens: Sequence[int], end_ids: frozenset[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in end_ids:
            return list(tokens[:index])
    return list(tokens)


def pad_batch(prompts: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask for a batch; transformers wants left padding, Neuron right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        span = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        ids[row, span] = torch.tensor(prompt, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


@dataclass
class StepHook(StoppingCriteria):
    """Reports each step's new tokens to `callback`; ends rows at end of turn."""

    prompt_width: int
    end_ids: frozenset[int]
    callback: StepCallback

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        rows = [cut_at_end(row, self.end_ids) for row in input_ids[:, self.prompt_width:].tolist()]
        stop_all = self.callback(rows)
        done = [stop_all or len(row) < input_ids.shape[1] - self.prompt_width for row in rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
