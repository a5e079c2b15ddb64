"""What the transformers and Neuron backends share: a model driven through transformers' generate()."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import StoppingCriteriaList

from engine.backends.base import Backend
from engine.config import GenerationSettings
from engine.generation import StepCallback, StepHook, clamp_new_tokens, cut_at_end, pad_batch, sampling_kwargs


def end_of_turn_ids(tokenizer, generation_config) -> frozenset[int]:
    configured = generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


class GenerateBackend(Backend):
    padding_side = "left"

    def __init__(self, model, tokenizer, sequence_length: int, batch_size: int):
        self.model = model
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.batch_size = batch_size
        self.end_ids = end_of_turn_ids(tokenizer, model.generation_config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.end_ids)

    def generation_kwargs(self, settings: GenerationSettings) -> dict:
        return sampling_kwargs(settings)

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        """Where the model wants its inputs."""
        return tensor

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        settings: GenerationSettings,
        on_step: StepCallback,
    ) -> list[list[int]]:
        input_ids, attention_mask = pad_batch(prompts, self.pad_id, side=self.padding_side)
        width = input_ids.shape[1]
        hook = StepHook(prompt_width=width, end_ids=self.end_ids, callback=on_step)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=self.place(input_ids),
                attention_mask=self.place(attention_mask),
                # Neither transformers nor optimum-neuron keeps prompt + output within the (compiled) length.
                max_new_tokens=clamp_new_tokens(width, settings.max_new_tokens, self.sequence_length),
                stopping_criteria=StoppingCriteriaList([hook]),
                eos_token_id=sorted(self.end_ids),
                pad_token_id=self.pad_id,
                **self.generation_kwargs(settings),
            )
        return [cut_at_end(row, self.end_ids) for row in output[:, width:].tolist()]
