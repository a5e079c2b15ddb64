"""Released sequences' KV, kept for the next prompts that begin with the same token ids.

A chat bot sends the whole conversation with every message: the next prompt begins with the
previous prompt and answer, and every prompt with the shared system prompt. Each entry is one
released sequence, its token ids and its keys and values trimmed to them; a prompt reuses the
longest common prefix with any entry. Keys and values of a token depend only on the tokens before
it, so matching on token ids is correct by construction: an edited or dropped turn simply matches less.

Memory is bounded (`budget_bytes`); the least recently used entries leave first. An entry that is a
prefix of a newer one adds nothing and leaves when the newer one arrives.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values, (kv heads, tokens, head dim)


@dataclass
class Entry:
    ids: torch.Tensor  # token ids, on the CPU
    layers: LayerKV
    size: int  # bytes


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    length = min(len(a), len(b))
    differ = (a[:length] != b[:length]).nonzero()
    return int(differ[0]) if len(differ) else length


class PrefixStore:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next_key = 0
        self.size = 0
        # The store's own counts (prompts looked up, prompts that reused something, tokens reused), for
        # tests and inspection; the worker's metrics come from each prefill's cached tokens.
        self.queries = self.hits = self.reused_tokens = 0

    def add(self, ids: list[int], layers: LayerKV) -> None:
        """Keep a copy of a released sequence's first len(ids) keys and values."""
        size = sum(keys.nbytes + values.nbytes for keys, values in layers)
        if not ids or size > self.budget_bytes:
            return
        new_ids = torch.tensor(ids)
        for key in [key for key, entry in self._entries.items() if common_prefix(entry.ids, new_ids) == len(entry.ids)]:
            self._drop(key)
        self._entries[self._next_key] = Entry(new_ids, [(k.clone(), v.clone()) for k, v in layers], size)
        self._next_key += 1
        self.size += size
        while self.size > self.budget_bytes:
            self._drop(next(iter(self._entries)))

    def longest_prefix(self, prompt: list[int], most: int) -> tuple[int, LayerKV]:
        """The most tokens (at most `most`) of `prompt` stored, and their keys and values (views, not copies)."""
        self.queries += 1
        ids = torch.tensor(prompt)
        best_key, best = None, 0
        for key, entry in self._entries.items():
            length = min(common_prefix(entry.ids, ids), most)
            if length > best:
                best_key, best = key, length
        if best_key is None:
            return 0, []
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        return best, [(keys[:, :best], values[:, :best]) for keys, values in self._entries[best_key].layers]

    def _drop(self, key: int) -> None:
        self.size -= self._entries.pop(key).size
