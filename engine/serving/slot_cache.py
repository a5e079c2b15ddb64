"""A KV cache with one preallocated line per slot, written in place: a decode step copies no cache.

Per layer, keys and values live in buffers of shape (slots, kv heads, sequence length + 1, head dim),
allocated at the first write. Each slot's tokens sit left-aligned from column 0 of its own line.
Before every model call the engine says where this call writes (`prepare_prefill` or
`prepare_decode`); each layer then writes its new keys and values there and hands attention a view
of the buffers up to the call's `width`, the columns the causal mask is built for.

The extra last column is scratch: rows that a decode step carries but no live slot owns write there,
so their lines stay as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class Write:
    """Where one model call puts its new keys and values."""

    rows: slice  # the batch rows of the call: a run of lines, so attention reads a view
    columns: torch.Tensor | slice  # (rows, 1) per-row columns for a decode step, a slice for a prefill
    width: int  # attention reads columns [0, width)


class SlotLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, slots: int, columns: int, write: list[Write]):
        super().__init__()
        self.slots = slots
        self.columns = columns
        self._write = write  # shared with the cache: the engine's plan for the current call

    def lazy_initialization(self, key_states: torch.Tensor) -> None:
        _, heads, _, head_dim = key_states.shape
        shape = (self.slots, heads, self.columns, head_dim)
        self.keys = key_states.new_zeros(shape)
        self.values = key_states.new_zeros(shape)
        self.is_initialized = True

    def update(self, key_states, value_states, cache_kwargs=None):
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        [write] = self._write
        if isinstance(write.columns, slice):
            self.keys[write.rows, :, write.columns] = key_states
            self.values[write.rows, :, write.columns] = value_states
        else:
            rows = torch.arange(write.rows.start, write.rows.stop, device=self.keys.device)[:, None]
            # Advanced indices around a slice put their dimensions first: (rows, 1, heads, head dim).
            self.keys[rows, :, write.columns] = key_states.transpose(1, 2)
            self.values[rows, :, write.columns] = value_states.transpose(1, 2)
        return self.keys[write.rows, :, : write.width], self.values[write.rows, :, : write.width]

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self._write[0].width, 0

    def get_seq_length(self) -> int:
        return self._write[0].width if self._write else 0

    def get_max_cache_shape(self) -> int:
        return self.columns - 1


class SlotCache(Cache):
    def __init__(self, layers: int, slots: int, sequence_length: int):
        self._write: list[Write] = []
        super().__init__(layers=[SlotLayer(slots, sequence_length + 1, self._write) for _ in range(layers)])
        self.scratch_column = sequence_length

    def _plan(self, write: Write) -> None:
        self._write[:] = [write]

    def prepare_prefill(self, slot: int, start: int, length: int) -> None:
        """Tokens [start, start + length) of `slot` come next; the line's columns before `start` are its prefix."""
        self._plan(Write(slice(slot, slot + 1), slice(start, start + length), start + length))

    def prepare_decode(self, rows: int, columns: torch.Tensor, width: int) -> None:
        """One token for each of lines [0, rows), written at `columns` (one per row)."""
        self._plan(Write(slice(0, rows), columns[:, None], width))

    def line(self, slot: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views of the first `length` keys and values of `slot`'s line, per layer."""
        return [(layer.keys[slot, :, :length], layer.values[slot, :, :length]) for layer in self.layers]

    def write_line(self, slot: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy keys and values (per layer, from column 0) into `slot`'s line."""
        for layer, (keys, values) in zip(self.layers, layers):
            layer.keys[slot, :, : keys.shape[1]] = keys
            layer.values[slot, :, : values.shape[1]] = values
