"""Slots on CPU or CUDA through transformers: rows of different lengths decode together in one forward pass.

transformers 4.57's own continuous batching sizes its paged cache from CUDA memory and fails on
the CPU, so the slots are kept here, in one `DynamicCache`:

    The cache holds one batch row per live slot (`_rows` gives each row's slot). Rows are aligned
    on the right: every row's newest cached token sits in the last column, and a row shorter than
    the widest is padded on the left with zeros that `_mask` (rows x columns, 1 = real token) hides
    from attention. A prefill runs alone, batch 1 and unpadded (exactly `generate`'s first step),
    and its cache joins as a new row, the narrower side padded on the left. A decode step feeds
    each row its last token at the row's own position, and the cache grows by one column. Releasing
    a slot drops its row and the left columns no remaining row uses.

Copies happen only when a slot joins or leaves; a decode step costs what `generate` costs.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from engine.assets import resolve_model
from engine.serving.engine import Engine, end_of_turn_ids
from engine.serving.sampling import Sampler
from service.config import GenerationSettings, ModelSettings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _pad_left(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class TransformersEngine(Engine):
    def __init__(self, model, tokenizer, sequence_length: int, batch_size: int, generation: GenerationSettings):
        self.model = model
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.batch_size = batch_size
        self.end_ids = end_of_turn_ids(tokenizer, model.generation_config)
        self.sampler = Sampler(generation)
        self.device = model.device
        self._cache: DynamicCache | None = None
        self._rows: list[int] = []
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self._histories: dict[int, list[int]] = {}  # each live slot's prompt and output; the last token is not cached yet

    @classmethod
    def load(cls, settings: ModelSettings, generation: GenerationSettings) -> TransformersEngine:
        started = time.monotonic()
        path = resolve_model(settings.id)
        device = settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if settings.threads and device == "cpu":
            torch.set_num_threads(settings.threads)
        dtype = settings.dtype
        if dtype == "auto":
            dtype = "float16" if device == "cuda" else "bfloat16"
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
        log.info(
            "model loaded",
            extra={
                "model": settings.id, "device": device, "dtype": dtype, "threads": torch.get_num_threads(),
                "slots": settings.batch_size, "seconds": round(time.monotonic() - started, 2),
            },
        )
        return cls(model, tokenizer, settings.sequence_length, settings.batch_size, generation)

    @torch.inference_mode()
    def prefill(self, slot: int, prompt: list[int]) -> int:
        if slot in self._histories:
            self.release(slot)
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([prompt], device=self.device)
        output = self.model(
            input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            raise NotImplementedError("the transformers engine serves full-attention models only (no sliding-window layers)")
        history = list(prompt)
        history.append(self.sampler(output.logits[:, -1], [history])[0])
        self._join(slot, cache, len(prompt))
        self._histories[slot] = history
        return history[-1]

    @torch.inference_mode()
    def decode(self, slots: list[int]) -> list[int]:
        if sorted(slots) != sorted(self._rows):
            raise ValueError(f"decode advances every live slot together: live {sorted(self._rows)}, asked {sorted(slots)}")
        histories = [self._histories[slot] for slot in self._rows]
        last = torch.tensor([[history[-1]] for history in histories], device=self.device)
        positions = torch.tensor([[len(history) - 1] for history in histories], device=self.device)
        self._mask = torch.cat([self._mask, torch.ones_like(last)], dim=1)
        output = self.model(
            input_ids=last, attention_mask=self._mask, position_ids=positions, past_key_values=self._cache, use_cache=True
        )
        tokens = self.sampler(output.logits[:, -1], histories)
        for history, token in zip(histories, tokens):
            history.append(token)
        by_slot = dict(zip(self._rows, tokens))
        return [by_slot[slot] for slot in slots]

    def release(self, slot: int) -> None:
        if self._histories.pop(slot, None) is None:
            return
        keep = [row for row, live in enumerate(self._rows) if live != slot]
        self._rows = [self._rows[row] for row in keep]
        if not keep:
            self._cache, self._mask = None, self._mask[:0, :0]
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask[index]
        first = int(mask.any(dim=0).nonzero()[0])  # columns before it are padding in every remaining row
        self._mask = mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]

    def _join(self, slot: int, cache: DynamicCache, length: int) -> None:
        width = self._mask.shape[1]
        new_width = max(width, length)
        row_mask = torch.ones((1, length), dtype=torch.long, device=self.device)
        self._mask = torch.cat([_pad_left(self._mask, new_width - width, 1), _pad_left(row_mask, new_width - length, 1)])
        if self._cache is None:
            self._cache = cache
        else:
            for mine, theirs in zip(self._cache.layers, cache.layers):
                mine.keys = torch.cat([_pad_left(mine.keys, new_width - width, 2), _pad_left(theirs.keys, new_width - length, 2)])
                mine.values = torch.cat(
                    [_pad_left(mine.values, new_width - width, 2), _pad_left(theirs.values, new_width - length, 2)]
                )
        self._rows.append(slot)
