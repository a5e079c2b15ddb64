"""transformers backend: CPU or CUDA."""

from __future__ import annotations

import logging
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.assets import resolve_model
from engine.backends.generate import GenerateBackend
from engine.config import ModelSettings

log = logging.getLogger(__name__)


class TransformersBackend(GenerateBackend):
    """CPU or CUDA; batches are left-padded, as decoder-only models in transformers expect."""

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.model.device)

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
