"""Prompts: render with the tokenizer's own chat template, fit the token budget.

Truncation drops the oldest exchanges. Instead of re-rendering and re-tokenizing after
each dropped exchange, it sums the token counts stored with each turn to find how many
exchanges fit, then checks that guess by encoding the rendered prompt, moving one
exchange at a time while the exact count disagrees. Exchanges sit between special tokens
in the templates we serve, so stored counts add up exactly and the check almost always
succeeds at once; the few tokens that move (Llama-2 folds the system prompt into the
first kept user turn) are what the check is for.

With `truncation_low_water` below 1, a history that does not fit is cut at sticky places
instead: each turn's `offset` (its absolute position in the conversation, in prompt tokens)
puts exchanges into blocks of (1 - low_water) x budget tokens, and the prompt starts at the
first exchange of a block. Successive prompts then start with the same exchange, so an
engine's prefix cache serves them, until the budget is full and the cut moves one block on.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from contract.history import Exchange, Turn
from service.config import ConfigError, Settings

TEMPLATE_MARKERS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
NEUTRALISER = "\u200b"  # zero-width space: keeps the text readable, breaks the control string
_PROBE = "ok"
CUT_MARK = " […]"
# How far the estimated size of a lone message may be off (Llama-2 tokenizes the first user text a
# little differently after the system block); within this distance of the budget it is counted exactly.
_SLACK = 16


@dataclass(frozen=True)
class Cut:
    kept_chars: int
    total_chars: int

    def notice(self) -> str:
        return (
            f"(Your message was too long for the model's context: only its first {self.kept_chars:,} "
            f"of {self.total_chars:,} characters were read.)"
        )


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]
    user_content: str  # the new user turn as the model saw it: neutralised, named, maybe cut
    kept_exchanges: int
    dropped_exchanges: int
    cut: Cut | None = None
    next_offset: int = 0  # where the exchange this prompt starts sits in the conversation (Turn.offset)


class PromptTooSmall(ConfigError):
    pass


def exchange_offsets(history: list[Exchange]) -> list[int]:
    """Where each exchange starts in the conversation, in prompt tokens.

    A stored offset is taken as it is. A turn stored before offsets existed sits right after the
    exchange before it, the first stored turn at 0: positions that move when storage trims old
    turns, until the worker's newer turns, which carry their offsets, replace them.
    """
    offsets, position = [], 0
    for exchange in history:
        position = position if exchange.user.offset is None else exchange.user.offset
        offsets.append(position)
        position += exchange.tokens
    return offsets


def next_offset(history: list[Exchange]) -> int:
    """Where an exchange added after `history` starts; 0 for a new (or reset) conversation."""
    return exchange_offsets(history)[-1] + history[-1].tokens if history else 0


def cut_points(offsets: list[int], block: int) -> list[int]:
    """Indexes of the exchanges that open a block: the oldest stored, and each first one past a block boundary."""
    return [i for i, offset in enumerate(offsets) if i == 0 or offset // block != offsets[i - 1] // block]


class PromptBuilder:
    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, system_prompt: str, max_prompt_tokens: int, low_water: float = 1.0
    ):
        self.tokenizer = tokenizer
        self.budget = max_prompt_tokens
        # Tokens per block of sticky cut points (model.truncation_low_water); 0: the exact rule, no blocks.
        self._block = max(1, round((1 - low_water) * max_prompt_tokens)) if low_water < 1 else 0
        # No token spells more characters than its vocabulary entry (byte tokens such as <0xF0>
        # spell fewer), so a text longer than budget x this cannot fit: cutting there first keeps
        # huge messages cheap without ever cutting one that fits.
        self._max_chars_per_token = max(map(len, tokenizer.get_vocab()))
        controls = set(TEMPLATE_MARKERS) | set(tokenizer.all_special_tokens)
        controls |= {token.content for token in tokenizer.added_tokens_decoder.values()}
        pattern = "|".join(re.escape(c) for c in sorted(controls, key=len, reverse=True) if len(c) > 1)
        self._controls = re.compile(pattern)
        self._probe_tokens = self.count(tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False))
        self._use_system_prompt(system_prompt)

    def with_system_prompt(self, system_prompt: str) -> PromptBuilder:
        """This builder with another system prompt (a channel's persona), sharing what it learnt of the tokenizer.

        Raises PromptTooSmall when that system prompt leaves no room for a message.
        """
        if system_prompt.strip() == self.system_prompt:
            return self
        other = copy.copy(self)
        other._use_system_prompt(system_prompt)
        return other

    def _use_system_prompt(self, system_prompt: str) -> None:
        self.system_prompt = system_prompt.strip()
        self._overhead = self.count(self.render([], _PROBE)) - self.count(_PROBE)  # system prompt and template
        smallest = self.count(self.render([], CUT_MARK))  # a message cut to nothing
        if smallest >= self.budget:
            raise PromptTooSmall(
                f"model.max_prompt_tokens ({self.budget}) leaves no room for a message: the system prompt and "
                f"template alone take {smallest} tokens"
            )

    @classmethod
    def for_settings(cls, tokenizer: PreTrainedTokenizerBase, settings: Settings) -> PromptBuilder:
        """The builder the worker uses: `chatbot prompt` must show exactly the prompt the worker would build."""
        return cls(tokenizer, settings.system_prompt, settings.model.max_prompt_tokens, settings.model.truncation_low_water)

    # --- text ---------------------------------------------------------------------------

    def neutralise(self, text: str) -> str:
        """User text can never forge a turn: control strings get a zero-width space after their first character."""
        return self._controls.sub(lambda m: m.group(0)[0] + NEUTRALISER + m.group(0)[1:], text)

    def user_content(self, text: str, name: str | None) -> str:
        text = self.neutralise(text)
        return f"{self.neutralise(name)}: {text}" if name else text

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def encode(self, text: str) -> list[int]:
        # The rendered prompt already holds its special tokens (`<s>` ...): add none.
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def render(self, exchanges: list[tuple[str, str]], user_content: str) -> str:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for user, assistant in exchanges:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": user_content})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # --- turns --------------------------------------------------------------------------

    def exchange_turns(
        self, user_content: str, assistant_text: str, name: str | None, offset: int | None = None
    ) -> tuple[Turn, Turn]:
        """The two turns to store, with the tokens they add to any later prompt, placed at `offset` (Prompt.next_offset)."""
        assistant_text = self.neutralise(assistant_text)
        messages = [{"role": "user", "content": user_content}, {"role": "assistant", "content": assistant_text}]
        probe = [{"role": "user", "content": _PROBE}]
        exchange_tokens = self.count(self.tokenizer.apply_chat_template(messages + probe, tokenize=False)) - self._probe_tokens
        user_tokens = min(self.count(user_content), exchange_tokens)
        return (
            Turn(role="user", text=user_content, name=name, tokens=user_tokens, offset=offset),
            Turn(
                role="assistant",
                text=assistant_text,
                tokens=exchange_tokens - user_tokens,
                offset=None if offset is None else offset + user_tokens,
            ),
        )

    # --- building -----------------------------------------------------------------------

    def build(self, history: list[Exchange], text: str, name: str | None = None) -> Prompt:
        content = self.user_content(text, name)
        offset = next_offset(history)
        if len(content) > self.budget * self._max_chars_per_token:
            return self._cut_to_fit(content, len(history), offset)
        alone = self.count(content) + self._overhead  # a render and an encode cheaper than the exact count...
        if alone > self.budget - _SLACK:  # ...which is only needed near the limit
            alone = self.count(self.render([], content))
            if alone > self.budget:
                return self._cut_to_fit(content, len(history), offset)

        pairs = [(e.user.text, e.assistant.text) for e in history]
        kept, total = 0, alone
        for exchange in reversed(history):
            if total + exchange.tokens > self.budget:
                break
            total += exchange.tokens
            kept += 1

        kept, prompt_text, ids = self._newest_that_fit(pairs, kept, content)
        if len(ids) > self.budget:  # the estimate of the lone message was off by more than _SLACK
            return self._cut_to_fit(content, len(pairs), offset)
        while kept < len(pairs):
            wider_text = self.render(pairs[len(pairs) - kept - 1:], content)
            wider_ids = self.encode(wider_text)
            if len(wider_ids) > self.budget:
                break
            kept, prompt_text, ids = kept + 1, wider_text, wider_ids
        start = self._sticky_start(history, len(pairs) - kept)
        if start > len(pairs) - kept:
            kept, prompt_text, ids = self._newest_that_fit(pairs, len(pairs) - start, content)
        return Prompt(prompt_text, ids, content, kept, len(pairs) - kept, next_offset=offset)

    def _newest_that_fit(self, pairs: list[tuple[str, str]], kept: int, content: str) -> tuple[int, str, list[int]]:
        """The newest `kept` exchanges, fewer while the exact count is over the budget (over with none: the caller cuts)."""
        prompt_text = self.render(pairs[len(pairs) - kept:], content)
        ids = self.encode(prompt_text)
        while len(ids) > self.budget and kept > 0:
            kept -= 1
            prompt_text = self.render(pairs[len(pairs) - kept:], content)
            ids = self.encode(prompt_text)
        return kept, prompt_text, ids

    def _sticky_start(self, history: list[Exchange], exact_start: int) -> int:
        """The first exchange to keep under the low-water rule: the oldest cut point at or after `exact_start`.

        With everything fitting, or the rule off, or no cut point left, it is `exact_start` itself.
        """
        if not self._block or exact_start == 0:
            return exact_start
        later = [i for i in cut_points(exchange_offsets(history), self._block) if i >= exact_start]
        return later[0] if later else exact_start

    def _cut_to_fit(self, content: str, history_len: int, offset: int) -> Prompt:
        """The longest start of `content`, in whole characters, that fits the budget with CUT_MARK after it."""
        total_chars = len(content)
        content = content[: self.budget * self._max_chars_per_token]
        # Where each token ends in the text. The byte tokens of one character (an emoji is four
        # under Llama-2's byte fallback) all span that character, so a cut between them is moved
        # back to the character's start rather than leaving half a character.
        spans = self.tokenizer(content, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
        keep = len(spans)
        while True:
            while 0 < keep < len(spans) and spans[keep][0] < spans[keep - 1][1]:
                keep -= 1
            kept_text = content[: spans[keep - 1][1]] if keep else ""
            candidate = kept_text + CUT_MARK
            prompt_text = self.render([], candidate)
            ids = self.encode(prompt_text)
            over = len(ids) - self.budget
            if over <= 0 or keep == 0:
                break
            keep = max(0, keep - over)
        cut = Cut(kept_chars=len(kept_text), total_chars=total_chars)
        return Prompt(prompt_text, ids, candidate, 0, history_len, cut, next_offset=offset)
