"""The one interface every model backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from engine.config import GenerationSettings
from engine.generation import StepCallback


class Backend(ABC):
    tokenizer: PreTrainedTokenizerBase
    sequence_length: int  # prompt + output never exceed it
    batch_size: int  # most prompts generated together
    end_ids: frozenset[int]  # tokens that end the assistant's turn

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        settings: GenerationSettings,
        on_step: StepCallback,
    ) -> list[list[int]]:
        """Generate for up to `batch_size` prompts together; returns each row's new tokens, cut at end of turn.

        `on_step` is called after every step (see engine.generation.StepCallback).
        """
