"""transformers backend: CPU or CUDA, batched with left padding."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList

from engine.assets import resolve_model
from engine.backends.base import Backend
from engine.config import GenerationSettings, ModelSettings
from engine.generation import StepCallback, StepHook, clamp_new_tokens, cut_at_end, pad_batch, sampling_kwargs

log = logging.getLogger(__name__)


def end_of_turn_ids(tokenizer, generation_config) -> frozenset[int]:
    configured = generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


class TransformersBackend(Backend):
    def __init__(self, model, tokenizer, sequence_length: int, batch_size: int):
        self.model = model
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.batch_size = batch_size
        self.end_ids = end_of_turn_ids(tokenizer, model.generation_config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.end_ids)

    @classmethod
    def load(cls, settings: ModelSettings) -> TransformersBackend:
        started = time.monotonic()
        path = resolve_model(settings.id)
        device = settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        log.info("model loaded", extra={"model": settings.id, "device": device, "seconds": round(time.monotonic() - started, 2)})
        return cls(model, tokenizer, settings.sequence_length, settings.batch_size)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        settings: GenerationSettings,
        on_step: StepCallback,
    ) -> list[list[int]]:
        input_ids, attention_mask = pad_batch(prompts, self.pad_id, side="left")
        width = input_ids.shape[1]
        hook = StepHook(prompt_width=width, end_ids=self.end_ids, callback=on_step)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(self.model.device),
                attention_mask=attention_mask.to(self.model.device),
                max_new_tokens=clamp_new_tokens(width, settings.max_new_tokens, self.sequence_length),
                stopping_criteria=StoppingCriteriaList([hook]),
                eos_token_id=sorted(self.end_ids),
                pad_token_id=self.pad_id,
                **sampling_kwargs(settings),
            )
        return [cut_at_end(row, self.end_ids) for row in output[:, width:].tolist()]
