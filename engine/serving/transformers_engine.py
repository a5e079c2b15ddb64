"""Slots on CPU or CUDA through transformers: rows of different lengths decode together in one forward pass.

transformers 4.57's own continuous batching sizes its paged cache from CUDA memory and fails on
the CPU, so the slots are kept here, in a `SlotCache` (slot_cache.py): one preallocated line per
slot, its tokens left-aligned from column 0.

    A prefill runs alone, batch 1 and unpadded (exactly `generate`'s first step), writing into its
    slot's line; with the prefix cache (prefix_store.py), the longest stored prefix of the prompt is
    copied into the line first and only the rest is run, at positions continuing from it. A decode step feeds lines [0, highest live slot] their last token at the row's own
    position and writes each new key and value in place at that position; attention reads the
    columns up to the longest live row, and a padding mask per row hides the columns past each
    row's end. Lines of free slots inside that range ride along: they attend to column 0 only and
    write to the scratch column, so they cost a row of compute and corrupt nothing.

No step copies the cache: a step at 1,500 tokens of context costs what attention over them costs
(on the CPU that includes transformers' sdpa path expanding the kv heads to the query heads).
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.assets import resolve_model
from engine.serving.engine import Engine, end_of_turn_ids
from engine.serving.prefix_store import PrefixStore
from engine.serving.sampling import Sampler
from engine.serving.slot_cache import SlotCache
from service.config import GenerationSettings, ModelSettings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersEngine(Engine):
    def __init__(
        self, model, tokenizer, sequence_length: int, batch_size: int, generation: GenerationSettings,
        prefix_cache_mb: int = 0,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.batch_size = batch_size
        self.end_ids = end_of_turn_ids(tokenizer, model.generation_config)
        self.sampler = Sampler(generation)
        self.device = model.device
        layer_types = getattr(model.config, "layer_types", None) or ["full_attention"]
        if set(layer_types) != {"full_attention"} or getattr(model.config, "sliding_window", None):
            raise NotImplementedError("the transformers engine serves full-attention models only (no sliding-window layers)")
        self._cache = SlotCache(model.config.num_hidden_layers, batch_size, sequence_length)
        self._histories: dict[int, list[int]] = {}  # each live slot's prompt and output; the last token is not cached yet
        self.prefix_cache = PrefixStore(prefix_cache_mb * 2**20) if prefix_cache_mb else None
        self._cached: dict[int, int] = {}  # per slot: prompt tokens its last prefill took from the prefix cache
        self.reuses_context = self.prefix_cache is not None

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
        return cls(model, tokenizer, settings.sequence_length, settings.batch_size, generation, settings.prefix_cache_mb)

    @torch.inference_mode()
    def prefill(self, slot: int, prompt: list[int]) -> int:
        self.release(slot)
        cached = 0
        if self.prefix_cache is not None:
            # At least the last prompt token is run: its logits give the first new token.
            cached, layers = self.prefix_cache.longest_prefix(prompt, len(prompt) - 1)
            self._cache.write_line(slot, layers)
        self._cached[slot] = cached
        self._cache.prepare_prefill(slot, cached, len(prompt) - cached)
        ids = torch.tensor([prompt[cached:]], device=self.device)
        positions = torch.arange(cached, len(prompt), device=self.device)
        output = self.model(
            input_ids=ids, attention_mask=torch.ones((1, len(prompt)), dtype=torch.long, device=self.device),
            position_ids=positions[None], cache_position=positions,
            past_key_values=self._cache, use_cache=True, logits_to_keep=1,
        )
        history = list(prompt)
        history.append(self.sampler(output.logits[:, -1], [history])[0])
        self._histories[slot] = history
        return history[-1]

    def cached_tokens(self, slot: int) -> int:
        return self._cached.get(slot, 0)

    @torch.inference_mode()
    def decode(self, slots: list[int]) -> list[int]:
        if sorted(slots) != sorted(self._histories):
            raise ValueError(
                f"decode advances every live slot together: live {sorted(self._histories)}, asked {sorted(slots)}"
            )
        rows = max(slots) + 1
        live = [self._histories.get(row) for row in range(rows)]
        last = torch.tensor([[history[-1] if history else 0] for history in live], device=self.device)
        positions = torch.tensor([len(history) - 1 if history else 0 for history in live], device=self.device)
        columns = torch.tensor(
            [len(history) - 1 if history else self._cache.scratch_column for history in live], device=self.device
        )
        width = int(positions.max()) + 1
        mask = (torch.arange(width, device=self.device)[None] <= positions[:, None]).long()
        self._cache.prepare_decode(rows, columns, width)
        output = self.model(
            input_ids=last, attention_mask=mask, position_ids=positions[:, None],
            cache_position=torch.tensor([width - 1], device=self.device), past_key_values=self._cache, use_cache=True, logits_to_keep=1,
        )
        histories = [self._histories[slot] for slot in slots]
        tokens = self.sampler(output.logits[slots, -1], histories)
        for history, token in zip(histories, tokens):
            history.append(token)
        return tokens

    def release(self, slot: int) -> None:
        history = self._histories.pop(slot, None)  # the line itself is simply overwritten by the slot's next prefill
        if history is not None and self.prefix_cache is not None:
            cached = history[:-1]
            self.prefix_cache.add(cached, self._cache.line(slot, len(cached)))
