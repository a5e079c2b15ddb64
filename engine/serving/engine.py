"""The one interface both model engines implement: slots, prefill, decode."""

from __future__ import annotations

import asyncio
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from transformers import GenerationConfig, PreTrainedTokenizerBase

T = TypeVar("T")

# Every model call of the process runs on this one thread, loading included: torch keeps CPU
# threading state per calling thread, and decoding on a thread other than the one that loaded
# the model measured 30-40% slower on the CPU (SmolLM2, 2 cores).
MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")


async def on_model_thread(function: Callable[..., T], *args) -> T:
    return await asyncio.get_running_loop().run_in_executor(MODEL_THREAD, functools.partial(function, *args))


class EngineRequestFailed(Exception):
    """A request to the engine's model server failed.

    `server_fault`: the server's doing (unreachable, 5xx, silent past its timeout, a stream cut
    or failed mid-answer), so the job is handed back uncharged, a bounded number of times; or the
    request's own (refused with a 4xx, answered in a form the engine cannot read), so the job is
    answered with an error. Whether the server is down altogether is `health()`'s to say.
    """

    def __init__(self, message: str, slot: int, server_fault: bool = True):
        super().__init__(message)
        self.slot = slot
        self.server_fault = server_fault


class Engine(ABC):
    """A model serving up to `batch_size` sequences at once, each in a slot (a KV-cache line).

    A slot is taken by `prefill`, advanced by `decode` together with the other live slots, and
    simply reused by the next `prefill` once its sequence has ended: nothing is freed. Prefill
    and decode are separate calls, never mixed, as optimum-neuron's compiled graphs require.
    """

    tokenizer: PreTrainedTokenizerBase
    sequence_length: int  # prompt + output never exceed it
    batch_size: int  # slots
    end_ids: frozenset[int]  # tokens that end the assistant's turn
    reuses_context: bool = False  # keeps released sequences' KV and prefills only what follows a known prefix

    def cached_tokens(self, slot: int) -> int:
        """Prompt tokens the slot's last prefill took from that cache instead of computing."""
        return 0

    @abstractmethod
    def prefill(self, slot: int, prompt: list[int]) -> int:
        """Put a prompt into `slot` (overwriting whatever it held) and return its first new token."""

    def prefill_many(self, requests: list[tuple[int, list[int]]]) -> list[int | None | Exception]:
        """Prefill several (slot, prompt) pairs: each first token, or the exception that prompt's prefill raised.

        In process, prompts are prefilled one after another; a server's engine sends them together,
        and gives None for a prompt whose first token is not there yet (the next decode brings it).
        """
        results: list[int | Exception] = []
        for slot, prompt in requests:
            try:
                results.append(self.prefill(slot, prompt))
            except Exception as error:
                results.append(error)
        return results

    @abstractmethod
    def decode(self, slots: list[int]) -> list[int | None]:
        """Feed each slot its last token in one model call; return each slot's next token, in order.

        None: no token for that slot this step (a model server slow on it, still within its timeout).
        """

    @abstractmethod
    def release(self, slot: int) -> None:
        """The slot's sequence has ended (or was dropped); engines that hold memory per sequence give it back."""

    def health(self) -> str | None:
        """What keeps a model server from serving now, or None. Engines in this process are as well as its loop."""
        return None


def saved_end_ids(tokenizer, model_id: str, generation_config: GenerationConfig | None = None) -> frozenset[int]:
    """End-of-turn ids: the tokenizer's, `generation_config`'s (a loaded model's), and those the model's
    saved generation_config.json names, which a config built from config.json alone lacks."""
    ids = end_of_turn_ids(tokenizer, generation_config or GenerationConfig())
    try:
        return ids | end_of_turn_ids(tokenizer, GenerationConfig.from_pretrained(model_id))
    except OSError:  # no generation_config.json
        return ids


def end_of_turn_ids(tokenizer, generation_config) -> frozenset[int]:
    configured = generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
