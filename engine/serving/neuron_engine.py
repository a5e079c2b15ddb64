"""Slots on Inferentia2: a model precompiled by `chatbot export`, driven as optimum-neuron 0.4.5's vLLM runner drives it.

A Llama exported with batch_size > 1 is compiled for continuous batching: its context-encoding
(prefill) graph takes one prompt at a time, padded to the compiled length, and writes the KV-cache
line named by `seq_ids`; its token-generation (decode) graph takes up to `batch_size` rows, each
with its own cache line and position. The calls below follow the runner line by line
(optimum/neuron/vllm/runner.py, `_prepare_prompt` 367-403 and `_prepare_decode` 405-444) and its
model wrapper (vllm/model_loader.py, `OptimumNeuronModelForCausalLM.forward` 170-198).

The compiled graphs have a fixed batch size and sequence length, so config.yaml must state the
same ones; the model is refused before its weights are loaded when it does not.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from engine.neuron.sdk import NeuronError, hub_errors, require_sdk
from engine.serving.engine import Engine, end_of_turn_ids, saved_end_ids
from engine.serving.sampling import Sampler, neuron_sampling_row
from service.config import GenerationSettings, ModelSettings

log = logging.getLogger(__name__)

NEURON_CONFIG = "neuron_config.json"
# config.yaml model.<setting> -> neuron_config.json key
COMPILED_SHAPE = {"batch_size": "batch_size", "sequence_length": "sequence_length", "tensor_parallel_size": "tp_degree"}


def compiled_shape(model_id: str) -> dict[str, int]:
    """batch_size, sequence_length and tp_degree the model was compiled with, read without loading it."""
    path = Path(model_id) / NEURON_CONFIG
    if not path.is_file():
        if Path(model_id).exists():
            raise NeuronError(f"{model_id} has no {NEURON_CONFIG}: it is not a model compiled by `chatbot export`")
        from huggingface_hub import hf_hub_download

        with hub_errors(f"read {NEURON_CONFIG} of {model_id} from the Hugging Face Hub"):
            path = Path(hf_hub_download(model_id, NEURON_CONFIG))
    config = json.loads(path.read_text())
    return {key: int(config[key]) for key in COMPILED_SHAPE.values()}


def local_copy(model_id: str) -> str:
    """A local folder for model_id, downloading a Hub repo whole.

    optimum-neuron's from_pretrained fetches only the compiled graphs of a Hub id and then looks
    for the weights in the original checkpoint's repo; `chatbot export` stores them in the
    compiled folder itself (checkpoint/), which only a full download brings.
    """
    if Path(model_id).is_dir():
        return model_id
    from huggingface_hub import snapshot_download

    with hub_errors(f"download {model_id} from the Hugging Face Hub"):
        return snapshot_download(model_id)


def check_shape(settings: ModelSettings, compiled: dict[str, int]) -> None:
    wrong = [
        f"model.{setting} is {getattr(settings, setting)} but {settings.id} was compiled with {compiled[key]}"
        for setting, key in COMPILED_SHAPE.items()
        if getattr(settings, setting) != compiled[key]
    ]
    if wrong:
        raise NeuronError("; ".join(wrong) + ": set config.yaml to the compiled values, or export the model again with yours")


class NeuronEngine(Engine):
    def __init__(self, model, tokenizer, generation: GenerationSettings, end_ids: frozenset[int] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.sequence_length = model.neuron_config.sequence_length
        self.batch_size = model.neuron_config.batch_size
        self.end_ids = end_ids or end_of_turn_ids(tokenizer, model.generation_config)
        # Exports by `chatbot export` sample on the device; a model compiled without it returns logits.
        self.on_device_sampling = bool(getattr(model.neuron_config, "on_device_sampling", False))
        self.sampler = Sampler(generation)
        self.sampling_row = neuron_sampling_row(generation)
        self._histories: dict[int, list[int]] = {}  # each slot's prompt and output; the last token is not cached yet

    @classmethod
    def load(cls, settings: ModelSettings, generation: GenerationSettings) -> NeuronEngine:
        require_sdk("the neuron backend")
        check_shape(settings, compiled_shape(settings.id))
        from optimum.neuron import NeuronModelForCausalLM

        started = time.monotonic()
        path = local_copy(settings.id)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = NeuronModelForCausalLM.from_pretrained(path)
        log.info(
            "model loaded",
            extra={
                "model": settings.id,
                "backend": "neuron",
                "batch_size": model.neuron_config.batch_size,
                "sequence_length": model.neuron_config.sequence_length,
                "cores": model.neuron_config.tp_degree,
                "seconds": round(time.monotonic() - started, 2),
            },
        )
        # optimum-neuron builds the model's generation config from config.json alone
        # (models/inference/backend/modules/generation/generation_utils.py:70,
        # `GenerationConfig.from_model_config(config)`): ids only generation_config.json names
        # (Llama-3's <|eot_id|>, for one) would not end an answer.
        return cls(model, tokenizer, generation, saved_end_ids(tokenizer, path, model.generation_config))

    @torch.inference_mode()
    def prefill(self, slot: int, prompt: list[int]) -> int:
        if not 0 <= slot < self.batch_size:
            raise ValueError(f"slot {slot} outside the compiled batch of {self.batch_size}")
        if len(prompt) < 2:
            # forward() takes a one-token input for a decode step (modeling_decoder.py:380)
            raise ValueError("a prompt needs at least two tokens to be prefilled")
        history = list(prompt)
        [token] = self._forward(
            input_ids=torch.tensor([prompt], dtype=torch.long),
            position_ids=torch.arange(len(prompt), dtype=torch.long)[None, :],
            seq_ids=torch.tensor([slot], dtype=torch.long),
            histories=[history],
        )
        history.append(token)
        self._histories[slot] = history
        return token

    @torch.inference_mode()
    def decode(self, slots: list[int]) -> list[int]:
        # Rows in cache-line order, as the runner's model wrapper sorts them before the call.
        ordered = sorted(slots)
        histories = [self._histories[slot] for slot in ordered]
        tokens = self._forward(
            input_ids=torch.tensor([[history[-1]] for history in histories], dtype=torch.long),
            position_ids=torch.tensor([[len(history) - 1] for history in histories], dtype=torch.long),
            seq_ids=torch.tensor(ordered, dtype=torch.long),
            histories=histories,
        )
        for history, token in zip(histories, tokens):
            history.append(token)
        by_slot = dict(zip(ordered, tokens))
        return [by_slot[slot] for slot in slots]

    def release(self, slot: int) -> None:
        # The cache line stays as it is: the next prefill of this slot overwrites it.
        self._histories.pop(slot, None)

    def _forward(self, input_ids, position_ids, seq_ids, histories: list[list[int]]) -> list[int]:
        rows = input_ids.shape[0]
        sampling_params = torch.tensor([self.sampling_row] * rows, dtype=torch.float32)
        output = self.model(input_ids=input_ids, position_ids=position_ids, seq_ids=seq_ids, sampling_params=sampling_params)
        if self.on_device_sampling:
            return output.reshape(rows).tolist()  # token ids, one per row
        return self.sampler(output[:, -1, :], histories)  # logits (rows, positions, vocab)
