"""A local stand-in for Slack: the Web API methods the adapter calls, and a Socket Mode websocket.

One aiohttp server on 127.0.0.1 serves both. Web API calls are recorded (method, body, the
token used, arrival time) and answered the way Slack answers them; each method checks the
kind of token Slack would want (xoxb- bot token, xapp- app-level token), and a test can make
the next call of a method meet Slack's rate limit (429 with Retry-After). Posted messages are
kept as Slack would show them: text entities decoded, edits applied. `apps.connections.open`
hands out this server's websocket URL; the socket greets with `hello`, a test pushes
envelopes with `send_envelope`, and the client's acknowledgements are recorded.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.local_server import serve_locally, shut_down, wait_until

TEAM_ID = "T0TEAM"
APP_ID = "A0APP"
BOT_USER_ID = "U0BOT"
BOT_ID = "B0BOT"
USERS = {"U1ALICE": "Alice", "U2BOB": "Bob"}
SOCKET_PATH = "/link"


def shown(text: str) -> str:
    """What Slack displays for message text: its three escaped characters decoded."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


@dataclass
class Call:
    method: str
    body: dict[str, Any]
    token: str | None
    at: float  # time.monotonic() on arrival


@dataclass
class Message:
    channel: str
    ts: str
    thread_ts: str | None
    raw: str  # the text as sent, escaped
    writes: list[float] = field(default_factory=list)  # post and edit times (monotonic)

    @property
    def text(self) -> str:
        return shown(self.raw)


class FakeSlack:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.messages: list[Message] = []
        self.acks: list[dict[str, Any]] = []
        self.connections = 0
        self.port = 0
        self._ts = itertools.count(1)
        self._sockets: set[web.WebSocketResponse] = set()
        self._limited: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)  # a few methods (users.info) are GETs
        app.router.add_get(SOCKET_PATH, self._socket)
        self._app = app

    async def start(self) -> FakeSlack:
        self._runner, self.port = await serve_locally(self._app)
        return self

    async def stop(self) -> None:
        await shut_down(self._runner, self._sockets)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def rate_limit_next(self, method: str, retry_after_s: int = 1) -> None:
        """Answer the next call of `method` with 429 Too Many Requests, as Slack does."""
        self._limited[method] = retry_after_s

    # --- what tests read ------------------------------------------------------------------

    def calls_to(self, method: str) -> list[Call]:
        return [call for call in self.calls if call.method == method]

    def messages_in(self, channel: str) -> list[Message]:
        return [message for message in self.messages if message.channel == channel]

    async def wait_for(self, condition: Callable[[], Any], timeout: float = 20.0) -> Any:
        return await wait_until(condition, timeout, "the fake Slack")

    # --- Web API --------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if request.content_type == "application/json":
            body = await request.json()
        else:
            body = {**request.query, **await request.post()}
        token = request.headers.get("Authorization", "").removeprefix("Bearer ") or body.get("token")
        self.calls.append(Call(method, body, token, time.monotonic()))
        wanted = "xapp-" if method == "apps.connections.open" else "xoxb-"
        if not token or not token.startswith(wanted):
            return web.json_response({"ok": False, "error": "not_allowed_token_type" if token else "not_authed"})
        if method in self._limited:
            retry_after = self._limited.pop(method)
            return web.json_response({"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": str(retry_after)})
        answer = getattr(self, "_" + method.replace(".", "_"), None)
        if answer is None:
            return web.json_response({"ok": False, "error": "unknown_method"})
        return web.json_response(answer(body))

    def _auth_test(self, body: dict) -> dict:
        return {"ok": True, "url": "https://fake.slack.test/", "team": "Fake", "user": "llama", "team_id": TEAM_ID,
                "user_id": BOT_USER_ID, "bot_id": BOT_ID, "is_enterprise_install": False}

    def _apps_connections_open(self, body: dict) -> dict:
        return {"ok": True, "url": f"ws://127.0.0.1:{self.port}{SOCKET_PATH}?ticket={uuid.uuid4()}"}

    def _users_info(self, body: dict) -> dict:
        user = body.get("user")
        if user not in USERS:
            return {"ok": False, "error": "user_not_found"}
        name = USERS[user]
        return {"ok": True, "user": {"id": user, "name": name.lower(), "profile": {"display_name": name, "real_name": name}}}

    def _chat_postMessage(self, body: dict) -> dict:
        if not body.get("channel") or not body.get("text"):
            return {"ok": False, "error": "channel_not_found" if not body.get("channel") else "no_text"}
        if len(body["text"]) > 40_000:
            return {"ok": False, "error": "msg_too_long"}
        number = next(self._ts)
        ts = f"{1_700_000_000 + number}.{number:06d}"
        message = Message(body["channel"], ts, body.get("thread_ts"), body["text"], [time.monotonic()])
        self.messages.append(message)
        return {"ok": True, "channel": message.channel, "ts": ts, "message": {"type": "message", "text": message.raw, "ts": ts}}

    def _chat_update(self, body: dict) -> dict:
        for message in self.messages:
            if message.channel == body.get("channel") and message.ts == body.get("ts"):
                if len(body.get("text", "")) > 40_000:
                    return {"ok": False, "error": "msg_too_long"}
                message.raw = body["text"]
                message.writes.append(time.monotonic())
                return {"ok": True, "channel": message.channel, "ts": message.ts, "text": message.raw}
        return {"ok": False, "error": "message_not_found"}

    def _chat_postEphemeral(self, body: dict) -> dict:
        return {"ok": True, "message_ts": f"{time.time():.6f}"}

    # --- Socket Mode ----------------------------------------------------------------------

    async def send_envelope(self, kind: str, payload: dict[str, Any]) -> str:
        """Push one envelope (events_api, slash_commands, ...) to every connected client."""
        envelope_id = str(uuid.uuid4())
        envelope = {"envelope_id": envelope_id, "type": kind, "payload": payload,
                    "accepts_response_payload": kind != "events_api", "retry_attempt": 0, "retry_reason": ""}
        await self.wait_for(lambda: self._sockets)
        for socket in list(self._sockets):
            await socket.send_json(envelope)
        return envelope_id

    def ack_of(self, envelope_id: str) -> dict[str, Any] | None:
        return next((ack for ack in self.acks if ack.get("envelope_id") == envelope_id), None)

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._sockets.add(socket)
        self.connections += 1
        await socket.send_json({"type": "hello", "num_connections": 1, "connection_info": {"app_id": APP_ID},
                                "debug_info": {"host": "fake", "approximate_connection_time": 3600}})
        try:
            async for frame in socket:
                if frame.type == WSMsgType.TEXT:
                    self.acks.append(frame.json())
        finally:
            self._sockets.discard(socket)
        return socket
