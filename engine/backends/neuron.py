"""Neuron backend: a model precompiled by `chatbot export`, run on Inferentia2 NeuronCores by optimum-neuron.

The compiled graphs have a fixed batch size and sequence length, so config.yaml must state the
same ones; the model is refused before its weights are loaded when it does not.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer

from engine.backends.generate import GenerateBackend
from engine.config import GenerationSettings, ModelSettings
from engine.generation import StepCallback
from engine.neuron.sdk import NeuronError, hub_errors, require_sdk

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


class NeuronBackend(GenerateBackend):
    # The compiled graphs reject left padding.
    padding_side = "right"

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer, model.neuron_config.sequence_length, model.neuron_config.batch_size)
        self.on_device_sampling = bool(getattr(model.neuron_config, "on_device_sampling", False))

    @classmethod
    def load(cls, settings: ModelSettings) -> NeuronBackend:
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
        return cls(model, tokenizer)

    def generation_kwargs(self, settings: GenerationSettings) -> dict:
        kwargs = super().generation_kwargs(settings)
        if self.on_device_sampling:
            # The on-device sampler never applies logits processors (greedy included); config.py
            # refuses a penalty other than 1.0 on this backend, so there is nothing to pass on.
            kwargs.pop("repetition_penalty")
        return kwargs

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        settings: GenerationSettings,
        on_step: StepCallback,
    ) -> list[list[int]]:
        if len(prompts) > self.batch_size:
            raise ValueError(f"{len(prompts)} prompts for a model compiled with batch size {self.batch_size}")
        # A batch smaller than the compiled one is passed as is: optimum-neuron pads it up to the
        # graph's batch and drops the extra rows itself (decoder_wrappers.py, _forward_with_pad);
        # dummy rows added here would each cost a full prefill pass, as prefill runs one row at a
        # time when batch_size > 1.
        return super().generate(prompts, settings, on_step)
