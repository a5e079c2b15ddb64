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

Each stream is read by a thread of its own as the server sends it, and a model step waits for all
live slots together, for at most `openai.timeout_s`: a slot with no token by then gives none this
step (the server is busy, serving its streams in turn). So one step, however many slots, never
outlasts `timeout_s` (below `queue.step_timeout_s`). A slot fails once it has waited `timeout_s`
while the whole server has sent nothing for as long: a busy server is waited for, a silent one is not.

A failed request raises `EngineRequestFailed`, saying whose fault it is: the server's (down, 5xx,
silent, a stream cut or failed mid-answer: the job goes back to the queue uncharged, a bounded
number of times) or the request's (a 4xx, a stream the engine cannot read: the job's answer is
an error). engine/worker.py acts on it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
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
    """One slot's streamed request: the tokens its reader has read and not yet handed out, and how it stands."""

    response: httpx.Response
    pending: deque[int] = field(default_factory=deque)
    finished: bool = False  # the server ended the answer
    failure: EngineRequestFailed | None = None  # the reader's, handed out by the next prefill or decode
    last_token_at: float = field(default_factory=time.monotonic)
    released: bool = False

    def ready(self) -> bool:
        return bool(self.pending) or self.finished or self.failure is not None


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
        batch_size: int, generation: GenerationSettings, timeout_s: float,
    ):
        self.client = client
        self.served_model = served_model
        self.tokenizer = tokenizer
        self.end_ids = end_ids
        self.sequence_length = sequence_length
        self.batch_size = batch_size
        self.max_new_tokens = generation.max_new_tokens
        self._sampling = sampling_fields(generation)
        self.timeout_s = timeout_s
        self._stream_timeout = httpx.Timeout(None, connect=min(CONNECT_TIMEOUT_S, timeout_s), write=timeout_s, pool=timeout_s)
        self._streams: dict[int, Stream] = {}
        self._arrived = threading.Condition()  # a reader has read something (or failed): a waiting step looks again
        self._server_sent_at = 0.0  # monotonic: the last token of any stream

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
            client, served, tokenizer, end_ids, settings.model.sequence_length, settings.model.batch_size, settings.generation,
            server.timeout_s,
        )

    # --- the Engine interface -----------------------------------------------------------

    def prefill(self, slot: int, prompt: list[int]) -> int:
        [first] = self.prefill_many([(slot, prompt)])
        if isinstance(first, Exception):
            raise first
        return first

    def prefill_many(self, requests: list[tuple[int, list[int]]]) -> list[int | None | Exception]:
        # Every request is sent before any first token is awaited: the server prefills them together.
        failures: dict[int, Exception] = {}
        for slot, prompt in requests:
            try:
                self._open(slot, prompt)
            except EngineRequestFailed as failure:
                failures[slot] = failure
        self._wait([slot for slot, _ in requests if slot not in failures])
        results: list[int | None | Exception] = []
        for slot, _ in requests:
            if slot not in failures:
                try:
                    results.append(self._take(slot))
                    continue
                except EngineRequestFailed as failure:
                    self.release(slot)
                    failures[slot] = failure
            results.append(failures[slot])
        return results

    def decode(self, slots: list[int]) -> list[int | None]:
        self._wait(slots)
        return [self._take(slot) for slot in slots]

    def release(self, slot: int) -> None:
        stream = self._streams.pop(slot, None)
        if stream is not None:
            stream.released = True
            stream.response.close()  # its reader stops, and the server stops generating for it

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
        # No read timeout on the stream: a busy server may leave one stream waiting while it serves the others,
        # and the silence that makes a request fail is the whole server's (_take).
        request = self.client.build_request("POST", "/completions", json=body, timeout=self._stream_timeout)
        try:
            response = self.client.send(request, stream=True)
        except httpx.HTTPError as error:
            raise EngineRequestFailed(f"the model server could not be asked: {describe(error)}", slot) from None
        if response.status_code != 200:
            detail = response.read().decode(errors="replace")[:300]
            response.close()
            # 5xx: the server failed (busy, restarting); 4xx: it refused this request, and would again.
            raise EngineRequestFailed(
                f"the model server answered {response.status_code}: {detail}", slot, server_fault=response.status_code >= 500
            )
        stream = self._streams[slot] = Stream(response)
        threading.Thread(target=self._read, args=(stream, slot), name=f"model-stream-{slot}", daemon=True).start()

    def _read(self, stream: Stream, slot: int) -> None:
        """A stream's reader thread: its tokens into `pending` as they come, until the server ends it or it is released."""
        try:
            for line in stream.response.iter_lines():
                self._read_line(stream, line, slot)
                if stream.finished:
                    break
            else:
                raise EngineRequestFailed("the model server closed the stream before it ended", slot)
        except EngineRequestFailed as failure:
            stream.failure = failure
        except httpx.HTTPError as error:
            stream.failure = EngineRequestFailed(f"the model server's stream failed: {describe(error)}", slot)
        except Exception as error:  # a closed response read by this thread: only a released stream sees it
            stream.failure = EngineRequestFailed(f"the model server's stream failed: {error!r}", slot)
        finally:
            with self._arrived:
                self._arrived.notify_all()

    def _wait(self, slots: list[int]) -> None:
        """Until every slot has something to hand out, or timeout_s has passed: one deadline for the whole step."""
        streams = [self._streams[slot] for slot in slots]
        with self._arrived:
            self._arrived.wait_for(lambda: all(stream.ready() for stream in streams), timeout=self.timeout_s)

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
            raise EngineRequestFailed(
                f"the model server sent a line that is not JSON: {data[:200]!r}", slot, server_fault=False
            ) from None
        if "error" in chunk:  # vLLM reports in the stream what it finds wrong once it has answered 200
            code = chunk["error"].get("code") if isinstance(chunk["error"], dict) else None
            refused = isinstance(code, int) and 400 <= code < 500
            raise EngineRequestFailed(f"the model server failed mid-answer: {chunk['error']}", slot, server_fault=not refused)
        for choice in chunk.get("choices", []):
            if "token_ids" not in choice:
                raise EngineRequestFailed(
                    "the model server's stream has no token ids: it must honour return_token_ids as vLLM does", slot,
                    server_fault=False,
                )
            with self._arrived:
                stream.pending.extend(choice["token_ids"] or [])
                if choice.get("finish_reason"):
                    stream.finished = True
                stream.last_token_at = self._server_sent_at = time.monotonic()
                self._arrived.notify_all()

    def _take(self, slot: int) -> int | None:
        """The slot's next token; None while the server is busy with others; its failure once it has failed, or
        waited timeout_s while the server sent nothing at all."""
        stream = self._streams[slot]
        if stream.pending:
            return stream.pending.popleft()
        if stream.finished:
            return min(self.end_ids)  # the server ended the answer without sending its end token
        if stream.failure is not None:
            raise stream.failure
        now = time.monotonic()
        if now - stream.last_token_at >= self.timeout_s and now - self._server_sent_at >= self.timeout_s:
            raise EngineRequestFailed(f"the model server sent nothing for {self.timeout_s:g} s", slot)
        return None


def describe(error: httpx.HTTPError) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
