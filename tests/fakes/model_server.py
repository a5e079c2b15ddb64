"""A fake OpenAI-compatible model server that fails as a real one does.

It speaks what the `openai` engine uses of vLLM: `GET /v1/models` and a streamed
`POST /v1/completions` whose chunks carry `token_ids` (`return_token_ids`). Every prompt is
answered with the same tokens, one a chunk. Requests can be made to fail, one by one, as a
busy, restarting or crashing server fails them, while `/v1/models` keeps answering at once (as
vLLM's API process does whatever its engine is doing):

- `slow_first_token(seconds)`: the first token comes that late (a queue in front of a busy engine);
- `status(code)`: the request is answered with that HTTP status (503 restarting, 400 refused);
- `cut_after(tokens)`: the stream stops after that many tokens, connection dropped (an engine crash);
- `busy(seconds)` for every request: tokens come one at a time across all streams, `seconds` apart
  (an engine so loaded that it serves its streams in turn).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from tests.fakes.local_server import serve_locally, shut_down


@dataclass(frozen=True)
class Fault:
    kind: Literal["slow_first_token", "status", "cut_after"]
    value: float


class FakeModelServer:
    def __init__(self, served: str, answer_ids: list[int], end_id: int, max_model_len: int = 2048):
        self.served = served
        self.answer_ids = answer_ids
        self.end_id = end_id
        self.max_model_len = max_model_len
        self.token_interval_s = 0.005
        self.faults: list[Fault] = []  # taken by the next requests, in order
        self.busy_interval_s: float | None = None
        self.requests: list[dict] = []
        self._turn = asyncio.Lock()  # while busy: one token at a time, whichever stream
        self._runner: web.AppRunner | None = None
        self.port = 0
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        self._app = app

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> FakeModelServer:
        self._runner, self.port = await serve_locally(self._app)
        return self

    async def stop(self) -> None:
        await shut_down(self._runner, set())

    def slow_first_token(self, seconds: float, times: int = 1) -> None:
        self.faults += [Fault("slow_first_token", seconds)] * times

    def status(self, code: int, times: int = 1) -> None:
        self.faults += [Fault("status", code)] * times

    def cut_after(self, tokens: int, times: int = 1) -> None:
        self.faults += [Fault("cut_after", tokens)] * times

    def busy(self, seconds: float | None) -> None:
        self.busy_interval_s = seconds

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.served, "max_model_len": self.max_model_len}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        fault = self.faults.pop(0) if self.faults else None
        if fault and fault.kind == "status":
            return web.json_response({"error": {"message": "failed", "code": int(fault.value)}}, status=int(fault.value))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if fault and fault.kind == "slow_first_token":
            await asyncio.sleep(fault.value)
        tokens = self.answer_ids[: body["max_tokens"]]
        ended = len(tokens) < body["max_tokens"]
        for index, token in enumerate(tokens):
            if fault and fault.kind == "cut_after" and index == fault.value:
                request.transport.abort()  # the engine died: no [DONE], the connection drops
                return response
            await self._pace()
            await self._send(response, [token], None)
        await self._send(response, [self.end_id] if ended else [], "stop" if ended else "length")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _pace(self) -> None:
        if self.busy_interval_s is None:
            await asyncio.sleep(self.token_interval_s)
            return
        async with self._turn:
            await asyncio.sleep(self.busy_interval_s)

    @staticmethod
    async def _send(response: web.StreamResponse, token_ids: list[int], finish_reason: str | None) -> None:
        chunk = {"choices": [{"index": 0, "text": "", "token_ids": token_ids, "finish_reason": finish_reason}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
