"""Choosing each slot's next token from the settings, with transformers' own processors and warpers."""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from service.config import GenerationSettings


class Sampler:
    """Next tokens for a batch of rows whose token histories differ in length.

    The processors are the ones `model.generate` builds, in its order (penalty, temperature,
    top-k, top-p), so greedy decoding here picks exactly what `generate` picks.
    """

    def __init__(self, settings: GenerationSettings):
        self.do_sample = settings.do_sample
        processors = []
        if settings.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
        if settings.do_sample:
            if settings.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k:
                processors.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                processors.append(TopPLogitsWarper(settings.top_p))
        self.processors = LogitsProcessorList(processors)

    def __call__(self, logits: torch.Tensor, histories: list[list[int]]) -> list[int]:
        """One token per row of `logits` (rows, vocab); `histories` are each row's prompt and output so far."""
        logits = logits.float()
        if self.processors:
            # Per row: the penalty reads the row's own history, and histories differ in length.
            logits = torch.cat(
                [self.processors(torch.tensor([history]), row[None, :]) for history, row in zip(histories, logits)]
            )
        if self.do_sample:
            return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)[:, 0].tolist()
        return logits.argmax(dim=-1).tolist()


def neuron_sampling_row(settings: GenerationSettings) -> list[float]:
    """One row of optimum-neuron's on-device `sampling_params`: [top_k, top_p, temperature].

    The layout of `prepare_sampling_params` (backend/modules/generation/sampling.py); greedy is
    top_k=1 as in its `_sample` (generation_utils.py) and vLLM runner (runner.py:48-52).
    """
    if not settings.do_sample:
        return [1.0, 1.0, 1.0]
    return [float(settings.top_k), settings.top_p, settings.temperature]
