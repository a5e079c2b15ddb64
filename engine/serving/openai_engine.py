"""Slots served by an OpenAI-compatible server (vLLM, `optimum-cli neuron serve`): one streamed request per slot.

The worker keeps everything it does with the in-process engines (claims, leases, history, the
prompt built and truncated with the served model's tokenizer, one atomic answer); only the model
runs elsewhere. A prefill opens a streamed `/v1/completions` request whose prompt is the exact
token ids the worker built, and returns its first token; a decode step hands each live slot its
next token, reading its stream when nothing is buffered. The server batches the requests itself,
so up to `batch_size` of them are in flight. Releasing a slot closes its stream, which makes the
server stop generating for it (a handed-back or abandoned job costs no more server time).

Token ids come from vLLM's `return_token_ids` (each streamed chunk carries the new ids), so what
the worker decodes and stores is what the model wrote, not a re-tokenised text.

Any failure of a request (server down, 5xx, a stream cut or silent past `timeout_s`) raises
`EngineRequestFailed`; the worker then asks `health()` whether the server is at fault.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
from transformers import AutoTokenizer

from engine.assets import resolve_model
from engine.serving.engine import Engine, EngineRequestFailed, saved_end_ids
from service.config import GenerationSettings, Settings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0


@dataclass
class Stream:
    """One slot's streamed request: the tokens read and not yet handed out, and whether the server has ended it."""

    response: httpx.Response
    lines: Iterator[str]
    pending: deque[int] = field(default_factory=deque)
    finished: bool = False


def sampling_fields(settings: GenerationSettings) -> dict:
    """The request's sampling, as vLLM reads it (top_k and repetition_penalty are its extensions)."""
    if not settings.do_sample:
        fields = {"temperature": 0.0}
    else:
        fields = {"temperature": settings.temperature, "top_p": settings.top_p}
        if settings.top_k:
            fields["top_k"] = settings.top_k
    if settings.repetition_penalty != 1.0:
        fields["repetition_penalty"] = settings.repetition_penalty
    return fields


class OpenAIEngine(Engine):
    def __init__(
        self, client: httpx.Client, served_model: str, tokenizer, end_ids: frozenset[int], sequence_length: int,
        batch_size: int, generation: GenerationSettings,
    ):
        self.client = client
        self.served_model = served_model
        self.tokenizer = tokenizer
        self.end_ids = end_ids
        self.sequence_length = sequence_length
        self.batch_size = batch_size
        self.max_new_tokens = generation.max_new_tokens
        self._sampling = sampling_fields(generation)
        self._streams: dict[int, Stream] = {}

    @classmethod
    def load(cls, settings: Settings, api_key: str | None) -> OpenAIEngine:
        path = resolve_model(settings.model.id)
        tokenizer = AutoTokenizer.from_pretrained(path)
        end_ids = saved_end_ids(tokenizer, path)
        server = settings.openai
        client = httpx.Client(
            base_url=server.base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
            timeout=httpx.Timeout(server.timeout_s, connect=min(CONNECT_TIMEOUT_S, server.timeout_s)),
            limits=httpx.Limits(max_connections=settings.model.batch_size + 1),  # the slots' streams and a health check
        )
        served = server.served_model or settings.model.id
        log.info("model server engine", extra={"base_url": server.base_url, "served_model": served, "slots": settings.model.batch_size})
        return cls(
            client, served, tokenizer, end_ids, settings.model.sequence_length, settings.model.batch_size, settings.generation
        )

    # --- the Engine interface -----------------------------------------------------------

    def prefill(self, slot: int, prompt: list[int]) -> int:
        [first] = self.prefill_many([(slot, prompt)])
        if isinstance(first, Exception):
            raise first
        return first

    def prefill_many(self, requests: list[tuple[int, list[int]]]) -> list[int | Exception]:
        # Every request is sent before any first token is awaited: the server prefills them together.
        failures: dict[int, Exception] = {}
        for slot, prompt in requests:
            try:
                self._open(slot, prompt)
            except EngineRequestFailed as failure:
                failures[slot] = failure
        results: list[int | Exception] = []
        for slot, _ in requests:
            if slot not in failures:
                try:
                    self._fill(slot)
                    results.append(self._take(slot))
                    continue
                except EngineRequestFailed as failure:
                    self.release(slot)
                    failures[slot] = failure
            results.append(failures[slot])
        return results

    def decode(self, slots: list[int]) -> list[int]:
        # Every slot's token is read before any is handed out: a failure leaves the others' intact.
        for slot in slots:
            self._fill(slot)
        return [self._take(slot) for slot in slots]

    def release(self, slot: int) -> None:
        stream = self._streams.pop(slot, None)
        if stream is not None:
            stream.response.close()

    def health(self) -> str | None:
        try:
            response = self.client.get("/models", timeout=CONNECT_TIMEOUT_S)
        except httpx.HTTPError as error:
            return f"model server unreachable: {describe(error)}"
        if response.status_code != 200:
            return f"model server answered {response.status_code} to GET /models"
        models = {entry.get("id"): entry for entry in response.json().get("data", [])}
        served = models.get(self.served_model)
        if served is None:
            return f"model server does not serve {self.served_model!r} (it serves {', '.join(map(str, models)) or 'nothing'})"
        if served.get("max_model_len") and served["max_model_len"] < self.sequence_length:
            return (
                f"model server's max_model_len ({served['max_model_len']}) is below model.sequence_length "
                f"({self.sequence_length}): prompt + answer could be refused"
            )
        return None

    # --- streams ------------------------------------------------------------------------

    def _open(self, slot: int, prompt: list[int]) -> None:
        self.release(slot)
        body = {
            "model": self.served_model,
            "prompt": prompt,
            "max_tokens": min(self.max_new_tokens, self.sequence_length - len(prompt)),
            "stream": True,
            "return_token_ids": True,
            "stop_token_ids": sorted(self.end_ids),
            **self._sampling,
        }
        try:
            response = self.client.send(self.client.build_request("POST", "/completions", json=body), stream=True)
        except httpx.HTTPError as error:
            raise EngineRequestFailed(f"the model server could not be asked: {describe(error)}", slot) from None
        if response.status_code != 200:
            detail = response.read().decode(errors="replace")[:300]
            response.close()
            raise EngineRequestFailed(f"the model server answered {response.status_code}: {detail}", slot)
        self._streams[slot] = Stream(response, response.iter_lines())

    def _fill(self, slot: int) -> None:
        """Read the slot's stream until it has a token to hand out or the server has ended it."""
        stream = self._streams[slot]
        try:
            while not stream.pending and not stream.finished:
                line = next(stream.lines, None)
                if line is None:
                    raise EngineRequestFailed("the model server closed the stream before it ended", slot)
                self._read_line(stream, line, slot)
        except httpx.HTTPError as error:
            raise EngineRequestFailed(f"the model server's stream failed: {describe(error)}", slot) from None

    def _read_line(self, stream: Stream, line: str, slot: int) -> None:
        if not line.startswith("data:"):
            return  # blank separators and SSE comments
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            stream.finished = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise EngineRequestFailed(f"the model server sent a line that is not JSON: {data[:200]!r}", slot) from None
        if "error" in chunk:
            raise EngineRequestFailed(f"the model server failed mid-answer: {chunk['error']}", slot)
        for choice in chunk.get("choices", []):
            if "token_ids" not in choice:
                raise EngineRequestFailed(
                    "the model server's stream has no token ids: it must honour return_token_ids as vLLM does", slot
                )
            stream.pending.extend(choice["token_ids"] or [])
            if choice.get("finish_reason"):
                stream.finished = True

    def _take(self, slot: int) -> int:
        stream = self._streams[slot]
        if stream.pending:
            return stream.pending.popleft()
        return min(self.end_ids)  # the server ended the answer without sending its end token


def describe(error: httpx.HTTPError) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
