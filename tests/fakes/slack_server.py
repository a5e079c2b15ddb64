"""A local stand-in for Slack: the Web API methods the adapter calls, and a Socket Mode websocket.

One aiohttp server on 127.0.0.1 serves both. Web API calls are recorded (method, body, the
token used, arrival time) and answered the way Slack answers them; each method checks the
kind of token Slack would want (xoxb- bot token, xapp- app-level token), and a test can make
the next call of a method, or a workspace's or channel's calls for a while, meet Slack's rate limit (429 with
Retry-After). Posted messages are kept as Slack would show them: mrkdwn entities decoded,
markdown as written, edits applied. Streams follow the chat.startStream / appendStream /
stopStream references: only in threads, with a recipient outside DMs, 12,000 characters a
call, `message_not_in_streaming_state` once stopped or expired (a test sets after how many
appends). The agent methods (assistant.threads.setStatus / setTitle / setSuggestedPrompts)
are recorded, and a reply in a thread clears its status, as Slack does; a status or title for a
thread Slack has not seen (no message of that ts in that channel) is `invalid_thread_ts`. Agent
sessions (agents.sessions.setStatus) keep each thread's lifecycle status, with Slack's
`missing_agent_session_stopped_event_subscription` warning while the manifest lacks that event;
`native_stop` is a person clicking Slack's Stop under a processing session: the thread's streams
stop, and it returns the `agent_session_stopped` event Slack sends. Ephemeral messages
(chat.postEphemeral) are kept with who may see them. Blocks
are checked against the Block Kit types the adapter uses: an unknown type or a missing required
field is `invalid_blocks`. Files a test shares (`share_file`, for a `file_share` event) are served
at their `url_private_download` to a bearer bot token only, as Slack serves them; anyone else is
redirected to a sign-in page. Each answer to a bot token carries the scopes it was granted in its
`x-oauth-scopes` header (the manifest's, unless a test changes `granted_scopes`); a token a test puts
in `invalid_tokens` is `invalid_auth`; `bots.info` and `apps.manifest.export` (an app configuration
token, xoxe.) describe the app as created from slack_manifest.yaml (`app_manifest`).
`apps.manifest.create` (xoxe.) keeps the manifest it is given (`created_apps`) and answers as
Slack does: the app's id, its credentials and the URL that installs it; a manifest without a
name or bot scopes is `invalid_manifest`, with the `errors` Slack lists.

Events reach the app as Slack sends them. Over HTTP (`deliver`), a request signed with the
app's signing secret goes to its Request URL and is retried, with X-Slack-Retry-Num and
X-Slack-Retry-Reason, when the app answers non-2xx or not within `ack_timeout_s` (Slack's 3 s).
Over Socket Mode, `apps.connections.open` hands out this server's websocket URL, the socket
greets with `hello`, a test pushes envelopes with `send_envelope`, the client's acknowledgements
are recorded, and an events_api envelope not acknowledged within `ack_timeout_s` is sent again
with `retry_attempt` counting. Slack retries three times: at once, after a minute, after five
(`retry_delays_s`, shorter in tests).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import time
import uuid
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import yaml
from aiohttp import WSMsgType, web
from slack_sdk.signature import SignatureVerifier

from service.config import Settings
from tests.fakes.local_server import serve_locally, shut_down, wait_until

TEAM_ID = "T0TEAM"
APP_ID = "A0APP"
BOT_USER_ID = "U0BOT"
BOT_ID = "B0BOT"
USERS = {"U1ALICE": "Alice", "U2BOB": "Bob"}
SOCKET_PATH = "/link"
FILES_PATH = "/files-pri"
ACK_TIMEOUT_S = 3.0  # Slack retries an event the app has not acknowledged within this
RETRY_DELAYS_S = (0.0, 60.0, 300.0)  # Slack's three retries: at once, after a minute, after five
CLIENT_ID = "1000000000.2000000000"  # the app's credentials for the OAuth flow (Basic Information → App Credentials)
CLIENT_SECRET = "fake-client-secret-0123456789"
AUTHORIZE_URL = "https://slack.com/oauth/v2/authorize"
# The app as created from the manifest: its scopes are granted, its events and commands configured.
MANIFEST = yaml.safe_load((Path(__file__).resolve().parents[2] / "slack_manifest.yaml").read_text())
# The kind of token a method wants (app-level for Socket Mode, an app configuration token to export
# a manifest); every other method wants a bot token.
TOKEN_KINDS = {"apps.connections.open": "xapp-", "apps.manifest.export": "xoxe.", "apps.manifest.create": "xoxe."}


def shown(text: str) -> str:
    """What Slack displays for message text: its three escaped characters decoded."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


@dataclass
class Answer:
    """What the app answered one request Slack sent it."""

    status: int | None  # None: no answer within the acknowledgement timeout
    body: str
    seconds: float


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
    raw: str  # the text as sent: mrkdwn `text` (escaped), or markdown
    writes: list[float] = field(default_factory=list)  # post, edit and stream times (monotonic)
    markdown: bool = False  # raw is markdown (markdown_text, streams): shown as written
    blocks: list[dict] = field(default_factory=list)
    streaming: bool = False  # between chat.startStream and chat.stopStream

    @property
    def text(self) -> str:
        """What a person reads: a markdown block's text if there is one, else the message text."""
        shown_blocks = [block["text"] for block in self.blocks if block.get("type") == "markdown"]
        if shown_blocks:
            return "".join(shown_blocks)
        return self.raw if self.markdown else shown(self.raw)

    @property
    def feedback_buttons(self) -> list[dict]:
        return [
            element
            for block in self.blocks if block.get("type") == "context_actions"
            for element in block.get("elements", []) if element.get("type") == "feedback_buttons"
        ]

    @property
    def buttons(self) -> dict[str, dict]:
        """The message's buttons by action_id."""
        return {
            element["action_id"]: element
            for block in self.blocks if block.get("type") == "actions"
            for element in block.get("elements", []) if element.get("type") == "button"
        }


@dataclass(frozen=True)
class Throttle:
    until: float  # time.monotonic()
    team: str | None
    channel: str | None
    method: str | None

    def matches(self, method: str, channel: str | None, team: str) -> bool:
        return (
            (self.team is None or self.team == team)
            and (self.channel is None or self.channel == channel)
            and (self.method is None or self.method == method)
        )


def _content(body: dict) -> tuple[str, bool] | None:
    """The text a post, update or stream call carries, and whether it is markdown."""
    if body.get("markdown_text") is not None:
        return body["markdown_text"], True
    chunks = body.get("chunks") or []
    if chunks:
        return "".join(chunk.get("text", "") for chunk in chunks if chunk.get("type") == "markdown_text"), True
    if body.get("text") is not None:
        return body["text"], False
    return None


def _text_object(value: Any, types: tuple[str, ...] = ("plain_text", "mrkdwn")) -> bool:
    return isinstance(value, dict) and value.get("type") in types and isinstance(value.get("text"), str) and bool(value["text"])


def _feedback_button(value: Any) -> bool:
    return isinstance(value, dict) and _text_object(value.get("text"), ("plain_text",)) and isinstance(value.get("value"), str)


# Each Block Kit type the adapter sends, with what Slack requires of it.
_ELEMENTS: dict[str, Callable[[dict], bool]] = {
    "feedback_buttons": lambda e: _feedback_button(e.get("positive_button")) and _feedback_button(e.get("negative_button")),
    "button": lambda e: _text_object(e.get("text"), ("plain_text",)) and len(e["text"]["text"]) <= 75
    and isinstance(e.get("action_id"), str) and len(e.get("value", "")) <= 2000,
}


def _elements(block: dict, allowed: tuple[str, ...]) -> bool:
    elements = block.get("elements")
    return bool(elements) and all(
        isinstance(e, dict) and e.get("type") in allowed and _ELEMENTS[e["type"]](e) for e in elements
    )


_BLOCKS: dict[str, Callable[[dict], bool]] = {
    "markdown": lambda b: isinstance(b.get("text"), str) and bool(b["text"]),
    "section": lambda b: _text_object(b.get("text")) or bool(b.get("fields")),
    "context_actions": lambda b: _elements(b, ("feedback_buttons",)),
    "actions": lambda b: _elements(b, ("button",)) and len(b["elements"]) <= 25,
}
SESSION_STATUSES = {"active", "processing", "suspended", "closed"}


def valid_blocks(blocks: Any) -> bool:
    return isinstance(blocks, list) and all(
        isinstance(block, dict) and _BLOCKS.get(block.get("type"), lambda _: False)(block) for block in blocks
    )


class FakeSlack:
    def __init__(self, signing_secret: str = "", retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S) -> None:
        self.calls: list[Call] = []
        self.messages: list[Message] = []
        self.acks: list[dict[str, Any]] = []
        self.envelopes: list[dict[str, Any]] = []  # every envelope pushed, sent again ones included
        self.signing_secret = signing_secret
        self.request_url: str | None = None  # the app's Request URL, for HTTP mode
        self.ack_timeout_s = ACK_TIMEOUT_S
        self.retry_delays_s = retry_delays_s
        self._seen: set[tuple[str, str]] = set()  # (channel, ts) of the messages Slack knows
        self.downloads: list[Call] = []  # shared files fetched, with the token shown
        self._files: dict[str, bytes] = {}  # by path
        self._redeliveries: set[asyncio.Task] = set()
        self.connections = 0
        self.port = 0
        self._ts = itertools.count(1)
        self._sockets: set[web.WebSocketResponse] = set()
        self._limited: dict[str, int] = {}
        self._throttles: list[Throttle] = []
        self.channel_teams: dict[str, str] = {}  # channels of other workspaces (an org-wide install); others are TEAM_ID's
        self.statuses: list[tuple[str, str, str]] = []  # (channel, thread_ts, status) as set, in order
        self.status_now: dict[tuple[str, str], str] = {}  # what each thread shows now
        self.titles: dict[tuple[str, str], str] = {}
        self.suggested: list[dict] = []  # setSuggestedPrompts bodies
        self.sessions: dict[tuple[str, str], str] = {}  # (channel, thread_ts) -> agent session status now
        self.ephemerals: list[dict] = []  # chat.postEphemeral bodies: channel, user (who sees it), text, thread_ts
        self.expire_after_appends: int | None = None  # a stream given this many appends then expires
        self._appends: dict[str, int] = {}
        self._refused: dict[str, str] = {}
        self._failing: dict[str, list[str]] = {}
        self._delays: dict[str, float] = {}
        self.granted_scopes: list[str] = list(MANIFEST["oauth_config"]["scopes"]["bot"])  # sent in x-oauth-scopes
        self.app_manifest: dict[str, Any] = copy.deepcopy(MANIFEST)  # what apps.manifest.export answers
        self.created_apps: list[dict[str, Any]] = []  # the manifests apps.manifest.create was given
        self.invalid_tokens: set[str] = set()  # revoked or mistyped: invalid_auth
        self.installed: dict[str, str] = {}  # bot token handed out by oauth.v2.access -> its workspace
        self._codes: dict[str, tuple[str, str, str]] = {}  # OAuth code -> (team, installer, scopes), until traded
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)  # a few methods (users.info) are GETs
        app.router.add_get(SOCKET_PATH, self._socket)
        app.router.add_get(FILES_PATH + "/{path:.*}", self._file)
        app.router.add_get("/signin", self._sign_in)
        self._app = app

    async def start(self) -> FakeSlack:
        self._runner, self.port = await serve_locally(self._app)
        return self

    async def stop(self) -> None:
        for task in self._redeliveries:
            task.cancel()
        await asyncio.gather(*self._redeliveries, return_exceptions=True)
        await shut_down(self._runner, self._sockets)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def serving(self, settings: Settings) -> Settings:
        """`settings` with slack.api_url at this fake."""
        return settings.model_copy(update={"slack": settings.slack.model_copy(update={"api_url": self.api_url})})

    def rate_limit_next(self, method: str, retry_after_s: int = 1) -> None:
        """Answer the next call of `method` with 429 Too Many Requests, as Slack does."""
        self._limited[method] = retry_after_s

    def delay(self, method: str, seconds: float) -> None:
        """Hold every call of `method` this long before handling it (a slow network or Slack)."""
        self._delays[method] = seconds

    def fail_next(self, method: str, failure: str = "internal_error", times: int = 1) -> None:
        """Fail the next `times` calls of `method` as Slack or its network can: an error Slack answers with
        (`internal_error`, `fatal_error`: HTTP 200, ok false), `http_503` (a 5xx page), or `reset` (the
        connection drops with no answer). The call is recorded, and does nothing."""
        self._failing.setdefault(method, []).extend([failure] * times)

    def refuse_method(self, method: str, error: str) -> None:
        """Answer every call of `method` with this error (a workspace without a feature, say)."""
        self._refused[method] = error

    def throttle(self, seconds: float, *, team: str | None = None, channel: str | None = None, method: str | None = None) -> None:
        """Answer 429 for `seconds` to the chat and assistant calls of a workspace, or of one channel and method."""
        self._throttles.append(Throttle(time.monotonic() + seconds, team, channel, method))

    def share_file(self, name: str, content: bytes, mimetype: str) -> dict[str, Any]:
        """A file as a message event's `files` describes it, served at its url_private_download."""
        file_id = f"F{next(self._ts):08d}"
        path = f"{FILES_PATH}/{TEAM_ID}-{file_id}/download/{name}"
        self._files[path] = content
        url = f"http://127.0.0.1:{self.port}{path}"
        return {"id": file_id, "name": name, "title": name, "mimetype": mimetype, "size": len(content), "mode": "hosted",
                "url_private": url.replace("/download/", "/"), "url_private_download": url}

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
        await asyncio.sleep(self._delays.get(method, 0.0))
        if method == "oauth.v2.access":  # the app's credentials, not a token
            return web.json_response(self._oauth_v2_access(body, request.headers.get("Authorization", "")))
        wanted = TOKEN_KINDS.get(method, "xoxb-")
        if not token or not token.startswith(wanted):
            return web.json_response({"ok": False, "error": "not_allowed_token_type" if token else "not_authed"})
        if token in self.invalid_tokens:
            return web.json_response({"ok": False, "error": "invalid_auth"})
        if token in self.installed and (body.get("channel") or body.get("channel_id")) and self._team_of(body) != self.installed[token]:
            return web.json_response({"ok": False, "error": "channel_not_found"})  # a workspace's token sees its own channels only
        if self._failing.get(method):
            failure = self._failing[method].pop(0)
            if failure == "reset":
                request.transport.abort()
                return web.Response(status=500)  # never sent: the connection is gone
            if failure.startswith("http_"):
                return web.Response(status=int(failure.removeprefix("http_")), text="<html>Service Unavailable</html>")
            return web.json_response({"ok": False, "error": failure})
        if method in self._limited:
            retry_after = self._limited.pop(method)
            return web.json_response({"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": str(retry_after)})
        if method in self._refused:
            return web.json_response({"ok": False, "error": self._refused[method]})
        now, channel = time.monotonic(), body.get("channel") or body.get("channel_id")
        for throttle in self._throttles:
            if now < throttle.until and method.startswith(("chat.", "assistant.")) and throttle.matches(method, channel, self._team_of(body)):
                retry_after = str(max(1, round(throttle.until - now)))
                return web.json_response({"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": retry_after})
        answer = getattr(self, "_" + method.replace(".", "_"), None)
        if answer is None:
            return web.json_response({"ok": False, "error": "unknown_method"})
        # Slack tells a bot token's scopes with every answer to it.
        scopes = {"x-oauth-scopes": ",".join(self.granted_scopes)} if wanted == "xoxb-" else {}
        return web.json_response(self._auth_test(token) if method == "auth.test" else answer(body), headers=scopes)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.downloads.append(Call("files", {"path": request.path}, token or None, time.monotonic()))
        if not token.startswith("xoxb-"):
            raise web.HTTPFound("/signin")
        content = self._files.get(request.path)
        return web.Response(body=content) if content is not None else web.Response(status=404)

    async def _sign_in(self, request: web.Request) -> web.Response:
        return web.Response(text="<html><body>Sign in to Slack</body></html>", content_type="text/html")

    def _auth_test(self, token: str) -> dict:
        team = self.installed.get(token, TEAM_ID)
        bot_user, bot = (BOT_USER_ID, BOT_ID) if team == TEAM_ID else (f"U0BOT{team}", f"B0BOT{team}")
        return {"ok": True, "url": "https://fake.slack.test/", "team": "Fake", "user": "llama", "team_id": team,
                "user_id": bot_user, "bot_id": bot, "is_enterprise_install": False}

    # --- OAuth: installs into more workspaces ---------------------------------------------

    def approve(self, authorize_url: str, team: str, installer: str = "U1ALICE") -> dict[str, str]:
        """A person in `team` clicks Allow on the authorize page the app sent them to: the query Slack
        appends to the app's redirect URL (`code`, `state`)."""
        url = urlsplit(authorize_url)
        query = {name: values[0] for name, values in parse_qs(url.query).items()}
        assert f"{url.scheme}://{url.netloc}{url.path}" == AUTHORIZE_URL, authorize_url
        assert query.get("client_id") == CLIENT_ID, "Slack shows an error page for an unknown client_id"
        requested = {scope for scope in query.get("scope", "").split(",") if scope}
        assert requested <= set(MANIFEST["oauth_config"]["scopes"]["bot"]), "Slack refuses scopes the app does not configure"
        code = f"code-{uuid.uuid4().hex}"
        self._codes[code] = (team, installer, ",".join(sorted(requested)))
        return {"code": code, "state": query.get("state", "")}

    def _oauth_v2_access(self, body: dict, authorization: str) -> dict:
        basic = authorization.removeprefix("Basic ")
        client_id, _, secret = b64decode(basic).decode().partition(":") if basic != authorization else ("", "", "")
        if (client_id or body.get("client_id")) != CLIENT_ID:
            return {"ok": False, "error": "invalid_client_id"}
        if (secret or body.get("client_secret")) != CLIENT_SECRET:
            return {"ok": False, "error": "bad_client_secret"}
        if body.get("code") not in self._codes:
            return {"ok": False, "error": "invalid_code"}  # unknown, or already traded
        team, installer, scopes = self._codes.pop(body["code"])
        token = f"xoxb-{team}-{uuid.uuid4().hex}"
        self.installed[token] = team
        return {"ok": True, "access_token": token, "token_type": "bot", "scope": scopes, "bot_user_id": f"U0BOT{team}",
                "app_id": APP_ID, "team": {"id": team, "name": f"Workspace {team}"}, "enterprise": None,
                "is_enterprise_install": False, "authed_user": {"id": installer}}

    def uninstall(self, team: str) -> dict[str, Any]:
        """Someone removes the app from `team`: its tokens stop working, and Slack sends this event."""
        self._revoke(team)
        return {"type": "app_uninstalled", "event_ts": f"{time.time():.6f}"}

    def revoke_bot(self, team: str) -> dict[str, Any]:
        """The bot's token in `team` is revoked (an admin, or Slack): it stops working, and Slack sends this event."""
        self._revoke(team)
        return {"type": "tokens_revoked", "tokens": {"oauth": [], "bot": [f"U0BOT{team}"]}, "event_ts": f"{time.time():.6f}"}

    def _revoke(self, team: str) -> None:
        self.invalid_tokens |= {token for token, installed_in in self.installed.items() if installed_in == team}

    def _apps_connections_open(self, body: dict) -> dict:
        return {"ok": True, "url": f"ws://127.0.0.1:{self.port}{SOCKET_PATH}?ticket={uuid.uuid4()}"}

    def _bots_info(self, body: dict) -> dict:
        if body.get("bot") != BOT_ID:
            return {"ok": False, "error": "bot_not_found"}
        return {"ok": True, "bot": {"id": BOT_ID, "deleted": False, "name": "llama", "updated": 0, "app_id": APP_ID,
                                    "user_id": BOT_USER_ID, "icons": {}}}

    def _apps_manifest_export(self, body: dict) -> dict:
        if body.get("app_id") != APP_ID:
            return {"ok": False, "error": "invalid_app_id"}
        return {"ok": True, "manifest": self.app_manifest}

    def _apps_manifest_create(self, body: dict) -> dict:
        manifest = body.get("manifest")
        manifest = json.loads(manifest) if isinstance(manifest, str) else manifest
        errors = [
            {"message": message, "pointer": pointer}
            for pointer, message, present in (
                ("/display_information/name", "must be provided", (manifest or {}).get("display_information", {}).get("name")),
                ("/oauth_config/scopes/bot", "must be provided", (manifest or {}).get("oauth_config", {}).get("scopes", {}).get("bot")),
            )
            if not present
        ]
        if errors:
            return {"ok": False, "error": "invalid_manifest", "errors": errors}
        self.created_apps.append(manifest)
        scopes = ",".join(manifest["oauth_config"]["scopes"]["bot"])
        return {
            "ok": True, "app_id": APP_ID,
            "credentials": {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "verification_token": "fake-verification",
                            "signing_secret": self.signing_secret or "fake-signing-secret"},
            "oauth_authorize_url": f"{AUTHORIZE_URL}?client_id={CLIENT_ID}&scope={scopes}",
        }

    def _users_info(self, body: dict) -> dict:
        user = body.get("user")
        if user not in USERS:
            return {"ok": False, "error": "user_not_found"}
        name = USERS[user]
        return {"ok": True, "user": {"id": user, "name": name.lower(), "profile": {"display_name": name, "real_name": name}}}

    def _team_of(self, body: dict) -> str:
        channel = body.get("channel") or body.get("channel_id") or ""
        return self.channel_teams.get(channel, TEAM_ID)

    def _new_message(self, channel: str, thread_ts: str | None, raw: str, markdown: bool, blocks: list[dict]) -> Message:
        number = next(self._ts)
        ts = f"{1_700_000_000 + number}.{number:06d}"
        message = Message(channel, ts, thread_ts, raw, [time.monotonic()], markdown, blocks)
        self.messages.append(message)
        self._seen.add((channel, ts))
        if thread_ts:
            self.status_now[(channel, thread_ts)] = ""  # Slack clears a thread's status when the app replies in it
        return message

    def _find(self, body: dict) -> Message | None:
        return next((m for m in self.messages if m.channel == body.get("channel") and m.ts == body.get("ts")), None)

    def _chat_postMessage(self, body: dict) -> dict:
        content = _content(body)
        if not body.get("channel"):
            return {"ok": False, "error": "channel_not_found"}
        if content is None and not body.get("blocks"):
            return {"ok": False, "error": "no_text"}
        raw, markdown = content or ("", False)
        if len(raw) > 40_000:
            return {"ok": False, "error": "msg_too_long"}
        if markdown and body.get("blocks"):
            return {"ok": False, "error": "invalid_arguments"}  # markdown_text cannot go with blocks
        if body.get("blocks") and not valid_blocks(body["blocks"]):
            return {"ok": False, "error": "invalid_blocks"}
        message = self._new_message(body["channel"], body.get("thread_ts"), raw, markdown, body.get("blocks") or [])
        return {"ok": True, "channel": message.channel, "ts": message.ts, "message": {"type": "message", "text": raw, "ts": message.ts}}

    def _chat_update(self, body: dict) -> dict:
        message = self._find(body)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        raw, markdown = _content(body) or ("", False)
        if len(raw) > 40_000:
            return {"ok": False, "error": "msg_too_long"}
        if body.get("blocks") and not valid_blocks(body["blocks"]):
            return {"ok": False, "error": "invalid_blocks"}
        message.raw, message.markdown, message.blocks = raw, markdown, body.get("blocks") or []
        message.streaming = False
        message.writes.append(time.monotonic())
        return {"ok": True, "channel": message.channel, "ts": message.ts, "text": message.raw}

    def _chat_delete(self, body: dict) -> dict:
        message = self._find(body)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        self.messages.remove(message)
        return {"ok": True, "channel": message.channel, "ts": message.ts}

    def _chat_startStream(self, body: dict) -> dict:
        channel = body.get("channel")
        if not channel or not body.get("thread_ts"):
            return {"ok": False, "error": "invalid_arguments"}  # streams live in threads
        if not channel.startswith("D") and not (body.get("recipient_team_id") and body.get("recipient_user_id")):
            return {"ok": False, "error": "invalid_arguments"}  # outside DMs a stream names its recipient
        raw, _ = _content(body) or ("", True)
        if len(raw) > 12_000:
            return {"ok": False, "error": "msg_too_long"}
        message = self._new_message(channel, body["thread_ts"], raw, True, [])
        message.streaming = True
        self._appends[message.ts] = 0
        return {"ok": True, "channel": channel, "ts": message.ts}

    def _chat_appendStream(self, body: dict) -> dict:
        message = self._find(body)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        if self.expire_after_appends is not None and self._appends.get(message.ts, 0) >= self.expire_after_appends:
            message.streaming = False
        if not message.streaming:
            return {"ok": False, "error": "message_not_in_streaming_state"}
        raw, _ = _content(body) or ("", True)
        if not raw or len(raw) > 12_000:
            return {"ok": False, "error": "invalid_arguments" if not raw else "msg_too_long"}
        self._appends[message.ts] += 1
        message.raw += raw
        message.writes.append(time.monotonic())
        return {"ok": True, "channel": message.channel, "ts": message.ts}

    def _chat_stopStream(self, body: dict) -> dict:
        message = self._find(body)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        if not message.streaming:
            return {"ok": False, "error": "message_not_in_streaming_state"}
        if body.get("blocks") and not valid_blocks(body["blocks"]):
            return {"ok": False, "error": "invalid_blocks"}
        raw, _ = _content(body) or ("", True)
        message.raw += raw
        message.blocks = body.get("blocks") or []
        message.streaming = False
        message.writes.append(time.monotonic())
        return {"ok": True, "channel": message.channel, "ts": message.ts, "message": {"text": message.raw}}

    def _assistant_threads_setStatus(self, body: dict) -> dict:
        if not body.get("channel_id") or not body.get("thread_ts") or "status" not in body:
            return {"ok": False, "error": "invalid_arguments"}
        if (body["channel_id"], body["thread_ts"]) not in self._seen:
            return {"ok": False, "error": "invalid_thread_ts"}
        self.statuses.append((body["channel_id"], body["thread_ts"], body["status"]))
        self.status_now[(body["channel_id"], body["thread_ts"])] = body["status"]
        return {"ok": True}

    def _assistant_threads_setTitle(self, body: dict) -> dict:
        if not body.get("channel_id") or not body.get("thread_ts") or not body.get("title"):
            return {"ok": False, "error": "invalid_arguments"}
        if (body["channel_id"], body["thread_ts"]) not in self._seen:
            return {"ok": False, "error": "invalid_thread_ts"}
        self.titles[(body["channel_id"], body["thread_ts"])] = body["title"]
        return {"ok": True}

    def _assistant_threads_setSuggestedPrompts(self, body: dict) -> dict:
        prompts = body.get("prompts")
        if not body.get("channel_id") or not prompts or len(prompts) > 4 or not all({"title", "message"} <= set(p) for p in prompts):
            return {"ok": False, "error": "invalid_arguments"}
        if body.get("thread_ts"):
            return {"ok": True}  # an agent app's prompts are the chat's: with thread_ts Slack silently drops them
        self.suggested.append(body)
        return {"ok": True}

    def _chat_postEphemeral(self, body: dict) -> dict:
        if not body.get("channel") or not body.get("user"):
            return {"ok": False, "error": "invalid_arguments"}
        if not body.get("text") and not body.get("blocks"):
            return {"ok": False, "error": "no_text"}
        self.ephemerals.append(body)
        return {"ok": True, "message_ts": f"{time.time():.6f}"}

    def _agents_sessions_setStatus(self, body: dict) -> dict:
        channel, thread = body.get("channel_id"), body.get("thread_ts")
        if not channel or body.get("status") not in SESSION_STATUSES:
            return {"ok": False, "error": "invalid_arguments"}
        if (channel, thread) not in self._seen:
            return {"ok": False, "error": "invalid_thread_ts"}
        self.sessions[(channel, thread)] = body["status"]
        answer = {"ok": True, "status": body["status"]}
        if "agent_session_stopped" not in self.app_manifest["settings"]["event_subscriptions"]["bot_events"]:
            answer["warning"] = "missing_agent_session_stopped_event_subscription"  # no Stop shown, only a loading line
        return answer

    def native_stop(self, channel: str, thread_ts: str, user: str) -> dict[str, Any]:
        """A person clicks Slack's Stop under a processing session: Slack stops the thread's streams and
        sends this event (the session's status stays for the app to change)."""
        assert self.sessions.get((channel, thread_ts)) == "processing", "Slack shows Stop only while a session is processing"
        stopped = [m for m in self.messages if m.channel == channel and m.thread_ts == thread_ts and m.streaming]
        for message in stopped:
            message.streaming = False
        return {"type": "agent_session_stopped", "channel": channel, "thread_ts": thread_ts, "user": user,
                "streaming_message_ts": [m.ts for m in stopped], "event_ts": f"{time.time():.6f}"}

    def _remember(self, payload: dict[str, Any]) -> None:
        """A person's message Slack sends the app is one Slack knows, and so is the thread it is in."""
        event = payload.get("event") or {}
        for ts in (event.get("ts"), event.get("thread_ts")):
            if event.get("channel") and ts:
                self._seen.add((event["channel"], ts))

    # --- HTTP mode ------------------------------------------------------------------------

    async def post(
        self, body: str, content_type: str = "application/json", *,
        timestamp: int | None = None, secret: str | None = None, headers: dict[str, str] | None = None,
    ) -> Answer:
        """One request to the app's Request URL, signed as Slack signs it (another secret or timestamp: a forgery)."""
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signature = SignatureVerifier(self.signing_secret if secret is None else secret).generate_signature(timestamp=stamp, body=body)
        sent = {"Content-Type": content_type, "X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": signature, **(headers or {})}
        started = time.monotonic()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.ack_timeout_s)) as session:
                async with session.post(self.request_url, data=body.encode(), headers=sent) as response:
                    return Answer(response.status, await response.text(), time.monotonic() - started)
        except TimeoutError:
            return Answer(None, "", time.monotonic() - started)

    async def deliver(self, payload: dict[str, Any]) -> list[Answer]:
        """Send an Events API payload as Slack does over HTTP; returns every attempt's answer, retries included."""
        self._remember(payload)
        body = json.dumps(payload)
        answers = [await self.post(body)]
        for retry, delay in enumerate(self.retry_delays_s, start=1):
            if answers[-1].status is not None and answers[-1].status < 300:
                break
            await asyncio.sleep(delay)
            reason = "http_timeout" if answers[-1].status is None else "http_error"
            answers.append(await self.post(body, headers={"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": reason}))
        return answers

    # --- Socket Mode ----------------------------------------------------------------------

    async def send_envelope(self, kind: str, payload: dict[str, Any]) -> str:
        """Push one envelope (events_api, slash_commands, ...) to every connected client.

        Slack sends an event again until it is acknowledged; commands and clicks it does not
        (the person sees an error instead).
        """
        self._remember(payload)
        envelope_id = await self._push(kind, payload, retry_attempt=0, retry_reason="")
        if kind == "events_api":
            task = asyncio.create_task(self._send_again_unless_acknowledged(kind, payload, envelope_id))
            self._redeliveries.add(task)
            task.add_done_callback(self._redeliveries.discard)
        return envelope_id

    async def _push(self, kind: str, payload: dict[str, Any], retry_attempt: int, retry_reason: str) -> str:
        envelope_id = str(uuid.uuid4())
        envelope = {"envelope_id": envelope_id, "type": kind, "payload": payload, "accepts_response_payload": kind != "events_api",
                    "retry_attempt": retry_attempt, "retry_reason": retry_reason}
        await self.wait_for(lambda: self._sockets)
        self.envelopes.append(envelope)
        for socket in list(self._sockets):
            await socket.send_json(envelope)
        return envelope_id

    async def _send_again_unless_acknowledged(self, kind: str, payload: dict[str, Any], envelope_id: str) -> None:
        for attempt, delay in enumerate(self.retry_delays_s, start=1):
            await asyncio.sleep(self.ack_timeout_s)
            if self.ack_of(envelope_id):
                return
            await asyncio.sleep(delay)
            envelope_id = await self._push(kind, payload, retry_attempt=attempt, retry_reason="timeout")

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
