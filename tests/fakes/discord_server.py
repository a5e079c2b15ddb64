"""A local stand-in for Discord: the REST routes and the gateway that discord.py's Client uses.

One aiohttp server on 127.0.0.1 serves both. REST requests are recorded (method, path, JSON
body, arrival time) and answered with payloads discord.py can parse. The gateway speaks plain
JSON text frames: discord.py asks for a compressed stream in the URL but decompresses only
binary frames, so text frames need no compression. A test pushes dispatches (MESSAGE_CREATE,
INTERACTION_CREATE, ...) to the connected clients (of its shard) with `dispatch`, and clicks a button of a
bot message with `click`. The bot messages keep their components (buttons) as the bot last
set them; an interaction is answered once, as Discord answers it (a second answer is refused).

The gateway shards as Discord does: IDENTIFY's `shard: [id, count]` names the session's shard
(none: one session for everything), a server belongs to shard `(guild_id >> 22) % count` and
its events (GUILD_CREATE, messages, interactions, threads) go to that shard's sessions only, DMs
to shard 0's; `GET /gateway/bot` answers `recommended_shards` and `max_concurrency`, and each
IDENTIFY is recorded in `identifies` (its shard, intents and time).

The fake world: one guild (shard 0 of any count) with a text channel, a mention-only channel, a closed channel, a
thread, two roles; users Alice (role "member"), Bob (no role), Ada (roles "member" and "admin"),
Carol (role "member", without Manage Channels), Dave (role "member", without Manage Channels or Manage
Messages; everyone else has every permission), another bot; a DM channel. `add_guild` adds servers of
one text channel each, on the shards a test chooses. The bot's application has the flags of `application_flags`, and
`GET /users/@me/guilds` lists the servers of `guild_permissions` with the bot's permissions there;
a request without the bot token is answered 401.

It fails as Discord and its network do, when told: `fail_next` answers a route's next calls with a
5xx, a 429 (with Retry-After) or a dropped connection, and `slow_next` answers them late. Every REST
exchange is held to Discord's published API (tests/fakes/discord_api.py) when the fake stops: a
request body or an answer the spec does not allow fails the test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.discord_api import Exchange, path_matches, spec_problems
from tests.fakes.local_server import serve_locally, shut_down, wait_until

API_PREFIX = "/api/v10"
GATEWAY_PATH = "/gateway"
HEARTBEAT_INTERVAL_MS = 41_250
TIMESTAMP = "2024-01-01T00:00:00Z"  # the spec's date-times are ISO 8601 in UTC with Z

BOT_ID = 900
APPLICATION_ID = 901
OWNER_ID = 902
GUILD_ID = 100
GENERAL = 200  # an ordinary text channel
QUIET = 201  # configured mention-only in the tests
CLOSED = 202  # left out of the channel allow-list in the tests
THREAD = 210  # a thread in GENERAL
DM_CHANNEL = 250
MEMBER_ROLE = 300
ADMIN_ROLE = 301
ALL_PERMISSIONS = 2147483647  # what a member's permissions in a channel say when nothing is withheld
MANAGE_CHANNELS = 1 << 4
MANAGE_MESSAGES = 1 << 13
COMPONENT_INTERACTION = 3  # an interaction's type when a button is clicked (MESSAGE_COMPONENT)
BUTTON = 2  # a component's type
ALREADY_ACKNOWLEDGED = {"message": "Interaction has already been acknowledged.", "code": 40060}
FAILURES = ("http_500", "http_502", "http_503", "ratelimited", "reset")


@dataclass(frozen=True)
class FakeUser:
    id: int
    name: str
    roles: tuple[int, ...] = ()
    bot: bool = False
    permissions: int = ALL_PERMISSIONS  # the member's permissions in the channel, as interactions carry them

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id), "username": self.name.lower(), "global_name": self.name, "public_flags": 0, "flags": 0,
            "primary_guild": None,
            "discriminator": "0", "avatar": None, "bot": self.bot,
        }

    def member(self) -> dict[str, Any]:
        return {
            "roles": [str(r) for r in self.roles], "nick": None, "joined_at": TIMESTAMP,
            "deaf": False, "mute": False, "flags": 0, "permissions": str(self.permissions),
        }


BOT = FakeUser(BOT_ID, "Llama", bot=True)
ALICE = FakeUser(1001, "Alice", roles=(MEMBER_ROLE,))
BOB = FakeUser(1002, "Bob")
ADMIN = FakeUser(1003, "Ada", roles=(MEMBER_ROLE, ADMIN_ROLE))
OTHER_BOT = FakeUser(1004, "Robot", bot=True)
CAROL = FakeUser(1005, "Carol", roles=(MEMBER_ROLE,), permissions=ALL_PERMISSIONS & ~MANAGE_CHANNELS)
DAVE = FakeUser(1006, "Dave", roles=(MEMBER_ROLE,), permissions=ALL_PERMISSIONS & ~MANAGE_CHANNELS & ~MANAGE_MESSAGES)


@dataclass
class Call:
    method: str
    path: str  # without the API prefix, e.g. /channels/200/messages
    body: Any
    at: float  # time.monotonic() on arrival


@dataclass
class Identify:
    shard: tuple[int, int]  # (id, count); (0, 1) for a session without sharding
    intents: int
    at: float  # time.monotonic() on arrival


def shard_of(guild_id: int, shard_count: int) -> int:
    """The gateway shard a server's events go to (Discord's formula)."""
    return (guild_id >> 22) % shard_count


@dataclass
class BotMessage:
    """A message the bot posted, with its edits."""

    id: int
    channel_id: int
    contents: list[str]
    reply_to: int | None  # the message it replies to
    times: list[float] = field(default_factory=list)  # post, then each edit
    components: list[list[dict[str, Any]]] = field(default_factory=list)  # its components after the post and each edit

    @property
    def text(self) -> str:
        return self.contents[-1]

    @property
    def buttons(self) -> list[dict[str, Any]]:
        """The buttons the message shows now."""
        return buttons_of(self.components[-1] if self.components else [])

    def button(self, custom_id_prefix: str) -> dict[str, Any] | None:
        """The button shown now whose custom_id starts with `custom_id_prefix`, if any."""
        return next((b for b in self.buttons if b.get("custom_id", "").startswith(custom_id_prefix)), None)


def buttons_of(components: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The buttons in a message's components (action rows of buttons)."""
    return [item for row in components for item in row.get("components", []) if item["type"] == BUTTON]


def subcommand(name: str, **strings: str) -> dict[str, Any]:
    """A subcommand option as Discord sends it in an interaction's `data.options` (type 1, SUB_COMMAND),
    with its string arguments (type 3, STRING)."""
    return {"name": name, "type": 1, "options": [{"name": key, "type": 3, "value": value} for key, value in strings.items()]}


def _numbered(components: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Components as Discord answers them: each with a numeric id, in order, rows and their items alike."""
    ids = itertools.count(1)
    return [
        {**row, "id": next(ids), "components": [{**item, "id": next(ids)} for item in row.get("components", [])]}
        for row in components
    ]


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py parses a body only when the content type is exactly application/json (no charset).
    return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"})


def _channel(channel_id: int, name: str, position: int, guild_id: int = GUILD_ID) -> dict[str, Any]:
    return {
        "id": str(channel_id), "type": 0, "name": name, "position": position, "guild_id": str(guild_id),
        "permission_overwrites": [], "nsfw": False, "parent_id": None, "topic": None, "last_message_id": None,
        "rate_limit_per_user": 0,
    }


def _role(role_id: int, name: str, position: int) -> dict[str, Any]:
    return {
        "id": str(role_id), "name": name, "color": 0, "hoist": False, "position": position,
        "permissions": "2147483647", "managed": False, "mentionable": True, "flags": 0, "icon": None,
    }


def thread_payload(
    thread_id: int, name: str, parent_id: int = GENERAL, owner: FakeUser = ALICE, guild_id: int = GUILD_ID
) -> dict[str, Any]:
    return {
        "id": str(thread_id), "type": 11, "name": name, "guild_id": str(guild_id), "parent_id": str(parent_id),
        "owner_id": str(owner.id), "last_message_id": None, "rate_limit_per_user": 0, "message_count": 0,
        "member_count": 1, "flags": 0, "total_message_sent": 0,
        "thread_metadata": {"archived": False, "auto_archive_duration": 1440, "archive_timestamp": TIMESTAMP, "locked": False},
    }


def guild_payload(guild_id: int = GUILD_ID, channel_ids: tuple[int, ...] = ()) -> dict[str, Any]:
    """GUILD_CREATE's payload: the test guild, or a server `add_guild` made with its text channels."""
    guild = {
        "id": str(guild_id), "name": f"Guild {guild_id}", "icon": None, "owner_id": str(OWNER_ID), "unavailable": False,
        "features": [], "emojis": [], "stickers": [], "large": False, "member_count": 2, "mfa_level": 0,
        "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
        "premium_tier": 0, "preferred_locale": "en-US", "nsfw_level": 0, "system_channel_flags": 0,
        "roles": [_role(guild_id, "@everyone", 0)],
        "channels": [_channel(channel_id, f"channel-{n}", n, guild_id) for n, channel_id in enumerate(channel_ids)],
        "threads": [], "members": [{**BOT.member(), "user": BOT.payload()}],
        "voice_states": [], "presences": [], "stage_instances": [], "guild_scheduled_events": [],
        "joined_at": TIMESTAMP,
    }
    if guild_id != GUILD_ID:
        return guild
    thread = thread_payload(THREAD, "a thread")
    return {
        **guild, "name": "Test guild", "member_count": 4,
        "roles": [_role(GUILD_ID, "@everyone", 0), _role(MEMBER_ROLE, "member", 1), _role(ADMIN_ROLE, "admin", 2)],
        "channels": [_channel(GENERAL, "general", 0), _channel(QUIET, "quiet", 1), _channel(CLOSED, "closed", 2)],
        "threads": [thread],
    }


class FakeDiscord:
    def __init__(self, token: str) -> None:
        self.token = token
        self.calls: list[Call] = []
        self.bot_messages: dict[int, BotMessage] = {}
        self.identified = 0  # gateway sessions that got READY
        self.identifies: list[Identify] = []
        self.recommended_shards = 1  # GET /gateway/bot's `shards`
        self.max_concurrency = 1  # sessions Discord starts at once (rate-limit buckets), per 5 s
        self.guilds: dict[int, tuple[int, ...]] = {GUILD_ID: (GENERAL, QUIET, CLOSED)}  # server -> its text channels
        self.guild_of: dict[int, int] = {GENERAL: GUILD_ID, QUIET: GUILD_ID, CLOSED: GUILD_ID, THREAD: GUILD_ID}  # channel -> server
        self.forbidden: set[int] = set()  # channels where the bot lacks Send Messages
        self.files: dict[str, bytes] = {}  # attachment id/file name -> content
        self.threads: dict[int, dict[str, Any]] = {}  # the threads the bot opened and has not deleted, by id
        self.slow_channels: set[int] = set()  # posts and edits there are answered once the channel leaves the set
        self.application_flags = 0  # the application's flags (GATEWAY_MESSAGE_CONTENT is 1 << 18)
        self.guild_permissions = {GUILD_ID: ALL_PERMISSIONS}  # the servers the bot is in, with its permissions there
        self.interactions: dict[str, dict[str, Any]] = {}  # the interactions dispatched, by id
        self.exchanges: list[Exchange] = []  # every REST request answered, with its answer
        self.failed: list[tuple[str, str, str]] = []  # (method, path, failure) of each request failed on purpose
        self._failing: list[tuple[str, str, str, float]] = []  # (method, spec path, failure, retry after s), in order
        self._slow: list[tuple[str, str, float]] = []  # (method, spec path, seconds)
        self.answered: set[str] = set()  # interactions the bot answered (Discord takes one answer each)
        self._ids = itertools.count(500_000)
        self._sockets: set[web.WebSocketResponse] = set()
        self._sessions: dict[web.WebSocketResponse, tuple[int, int]] = {}  # identified sockets -> (shard id, shard count)
        self._seq = itertools.count(1)
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> FakeDiscord:
        app = web.Application()
        app.router.add_get(GATEWAY_PATH, self._gateway)
        app.router.add_route("*", API_PREFIX + "/{tail:.*}", self._rest)
        app.router.add_get("/attachments/{name:.*}", self._attachment)
        self._runner, self.port = await serve_locally(app)
        return self

    async def stop(self) -> None:
        self._stopping.set()
        await shut_down(self._runner, self._sockets)
        problems = spec_problems(self.exchanges)
        assert not problems, "the REST exchanges break Discord's published API:\n" + "\n".join(problems)

    def fail_next(self, method: str, path: str, failure: str, times: int = 1, retry_after_s: float = 0.3) -> None:
        """Fail the next `times` requests of a route (`path` as the spec writes it, e.g.
        /channels/{channel_id}/messages/{message_id}): `http_500`/`http_502`/`http_503`, `ratelimited` (429 with
        Retry-After), or `reset` (the connection drops with no answer). A failed request does nothing."""
        assert failure in FAILURES, failure
        self._failing += [(method, path, failure, retry_after_s)] * times

    def slow_next(self, method: str, path: str, seconds: float, times: int = 1) -> None:
        """Answer the next `times` requests of a route `seconds` late (they take effect at once)."""
        self._slow += [(method, path, seconds)] * times

    @property
    def cdn_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def rest_base(self) -> str:
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{GATEWAY_PATH}"

    # --- what the test drives -----------------------------------------------------------

    def next_id(self) -> int:
        return next(self._ids)

    def add_guild(self, shard_id: int, shard_count: int) -> tuple[int, int]:
        """A server on shard `shard_id` of `shard_count`, with one text channel: (guild id, channel id)."""
        guild_id = (len(self.guilds) * shard_count + shard_id) << 22
        channel_id = self.next_id()
        self.guilds[guild_id] = (channel_id,)
        self.guild_of[channel_id] = guild_id
        return guild_id, channel_id

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send the event to the sessions of its server's shard; one without a server (a DM) to shard 0's."""
        if event == "INTERACTION_CREATE":
            self.interactions[data["id"]] = data
        guild_id = int(data.get("guild_id") or 0)
        for socket, (shard_id, shard_count) in list(self._sessions.items()):
            if shard_of(guild_id, shard_count) == shard_id:
                await socket.send_json({"op": 0, "t": event, "s": next(self._seq), "d": data})

    def message(
        self,
        content: str,
        author: FakeUser = ALICE,
        channel_id: int = GENERAL,
        *,
        mentions: tuple[FakeUser, ...] = (),
        type: int = 0,
        message_id: int | None = None,
        files: tuple[tuple[str, str, bytes], ...] = (),
        stickers: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """A MESSAGE_CREATE payload; DM_CHANNEL makes it a DM (no guild, no member).

        `files` are (file name, content type, bytes): attachments served as Discord's CDN serves them.
        """
        data: dict[str, Any] = {
            "id": str(message_id or self.next_id()), "channel_id": str(channel_id), "type": type,
            "content": content, "author": author.payload(), "timestamp": TIMESTAMP, "edited_timestamp": None,
            "tts": False, "mention_everyone": False, "mention_roles": [], "attachments": [], "embeds": [],
            "pinned": False, "flags": 0,
            "mentions": [{**user.payload(), "member": user.member()} for user in mentions],
        }
        for filename, content_type, content in files:
            attachment_id = self.next_id()
            self.files[f"{attachment_id}/{filename}"] = content
            url = f"{self.cdn_base}/attachments/{attachment_id}/{filename}"
            data["attachments"].append({
                "id": str(attachment_id), "filename": filename, "size": len(content), "url": url, "proxy_url": url,
                "content_type": content_type,
            })
        if stickers:
            data["sticker_items"] = [{"id": str(self.next_id()), "name": name, "format_type": 1} for name in stickers]
        if channel_id != DM_CHANNEL:
            data["guild_id"] = str(self.guild_of.get(channel_id, GUILD_ID))
            data["member"] = author.member()
        return data

    def interaction(
        self, name: str, user: FakeUser = ALICE, channel_id: int = GENERAL, options: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """An INTERACTION_CREATE payload for the command `name`: the guild's command in a guild channel
        or thread, the global one in DM_CHANNEL. `options` are its `data.options`, e.g. [subcommand("set", text="...")]."""
        data = {
            "id": str(self.next_id()), "application_id": str(APPLICATION_ID), "type": 2,
            "token": f"interaction-token-{self.next_id()}", "version": 1, "channel_id": str(channel_id),
            "data": {"id": str(self.next_id()), "name": name, "type": 1, **({"options": options} if options is not None else {})},
            "app_permissions": "2147483647", "locale": "en-US", "attachment_size_limit": 8_388_608, "entitlements": [],
        }
        if channel_id == DM_CHANNEL:
            return {
                **data, "user": user.payload(), "channel": {"id": str(channel_id), "type": 1},
                "authorizing_integration_owners": {"0": str(user.id)}, "context": 1,
            }
        guild_id = self.guild_of.get(channel_id, GUILD_ID)
        if channel_id == THREAD:
            channel = thread_payload(channel_id, "a thread")
        else:
            channel = _channel(channel_id, "a channel", 0, guild_id)
        return {
            **data, "guild_id": str(guild_id), "guild_locale": "en-US", "channel": channel,
            "member": {**user.member(), "user": user.payload()},
            "data": {**data["data"], "guild_id": str(guild_id)},
            "authorizing_integration_owners": {"0": str(guild_id)}, "context": 0,
        }

    def click(self, message_id: int, custom_id: str, user: FakeUser = ALICE) -> dict[str, Any]:
        """An INTERACTION_CREATE payload for `user` clicking the button `custom_id` on the bot message
        `message_id`, as Discord sends it (the message with its components, the member's permissions)."""
        message = self.bot_messages[message_id]
        data = self.interaction("", user=user, channel_id=message.channel_id)
        return {
            **data, "type": COMPONENT_INTERACTION, "message": self._message_payload(message),
            "data": {"custom_id": custom_id, "component_type": BUTTON},
        }

    def requests(self, method: str | None = None, prefix: str = "") -> list[Call]:
        return [c for c in self.calls if (method is None or c.method == method) and c.path.startswith(prefix)]

    def replies_to(self, message_id: int) -> list[BotMessage]:
        """The bot messages of one answer: the reply to `message_id` and the follow-ups in its channel after it."""
        messages = sorted(self.bot_messages.values(), key=lambda m: m.id)
        first = next((m for m in messages if m.reply_to == message_id), None)
        if first is None:
            return []
        answer = [first]
        for message in messages:
            if message.id > first.id and message.channel_id == first.channel_id:
                if message.reply_to is not None:
                    break
                answer.append(message)
        return answer

    async def wait_for(self, condition: Callable[[], Any], timeout: float = 20.0) -> Any:
        return await wait_until(condition, timeout, "the fake Discord")

    # --- gateway ------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._sockets.add(socket)
        try:
            await socket.send_json({"op": 10, "d": {"heartbeat_interval": HEARTBEAT_INTERVAL_MS}})
            async for frame in socket:
                if frame.type != WSMsgType.TEXT:
                    continue
                payload = frame.json()
                if payload["op"] == 1:
                    await socket.send_json({"op": 11})
                elif payload["op"] == 2:
                    await self._identify(socket, payload["d"])
        finally:
            self._sockets.discard(socket)
            self._sessions.pop(socket, None)
        return socket

    async def _identify(self, socket: web.WebSocketResponse, identify: dict[str, Any]) -> None:
        shard_id, shard_count = identify.get("shard", (0, 1))
        self.identifies.append(Identify((shard_id, shard_count), identify.get("intents", 0), time.monotonic()))
        guilds = [guild_id for guild_id in self.guilds if shard_of(guild_id, shard_count) == shard_id]
        ready = {
            "v": 10, "user": BOT.payload(), "session_id": f"session-{self.identified}",
            "resume_gateway_url": self.gateway_url, "guilds": [{"id": str(guild_id), "unavailable": True} for guild_id in guilds],
            "application": {"id": str(APPLICATION_ID), "flags": self.application_flags}, "private_channels": [],
            **({"shard": [shard_id, shard_count]} if "shard" in identify else {}),
        }
        await socket.send_json({"op": 0, "t": "READY", "s": next(self._seq), "d": ready})
        for guild_id in guilds:
            await socket.send_json({"op": 0, "t": "GUILD_CREATE", "s": next(self._seq), "d": guild_payload(guild_id, self.guilds[guild_id])})
        self._sessions[socket] = (shard_id, shard_count)
        self.identified += 1

    # --- REST ---------------------------------------------------------------------------

    async def _attachment(self, request: web.Request) -> web.StreamResponse:
        self.calls.append(Call("GET", request.path, None, time.monotonic()))
        content = self.files.get(request.match_info["name"])
        return web.Response(body=content) if content is not None else web.Response(status=404)

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        body = await request.json() if request.can_read_body else None
        if (failure := self._take(self._failing, request.method, path)) is not None:
            return self._failed(request, body, *failure[2:])
        response = await self._serve(request, path, body)
        if (slow := self._take(self._slow, request.method, path)) is not None:
            await asyncio.sleep(slow[2])
        answer = json.loads(response.text) if response.content_type == "application/json" else None
        self.exchanges.append(Exchange(request.method, path, body, response.status, answer))
        return response

    @staticmethod
    def _take(rules: list[tuple], method: str, path: str) -> tuple | None:
        for index, rule in enumerate(rules):
            if rule[0] == method and path_matches(rule[1], path):
                return rules.pop(index)
        return None

    def _failed(self, request: web.Request, body: Any, failure: str, retry_after_s: float) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        self.failed.append((request.method, path, failure))
        if failure == "reset":
            request.transport.abort()
            return web.Response(status=500)  # never sent: the connection is gone
        if failure == "ratelimited":
            answer = {"message": "You are being rate limited.", "retry_after": retry_after_s, "global": False, "code": 0}
            headers = {"Retry-After": str(retry_after_s), "X-RateLimit-Scope": "user"}
            response = _json(answer, status=429)
            response.headers.update(headers)
        else:
            answer = {"message": "Internal Server Error", "code": 0}
            response = _json(answer, status=int(failure.removeprefix("http_")))
        self.exchanges.append(Exchange(request.method, path, body, response.status, answer))
        return response

    async def _serve(self, request: web.Request, path: str, body: Any) -> web.StreamResponse:
        parts = path.strip("/").split("/")
        # Interaction callbacks are authorised by their token in the URL, everything else by the bot token.
        if parts[0] != "interactions" and request.headers.get("Authorization") != f"Bot {self.token}":
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        if parts[0] == "channels" and int(parts[1]) in self.slow_channels and parts[2:3] == ["messages"]:
            while int(parts[1]) in self.slow_channels and not self._stopping.is_set():
                await asyncio.sleep(0.01)
        self.calls.append(Call(request.method, path, body, time.monotonic()))
        if request.method == "POST" and parts[0] == "channels" and parts[2::2] == ["messages", "threads"]:
            # A thread started from a message takes the message's id; the gateway announces it too.
            guild_id = self.guild_of.get(int(parts[1]), GUILD_ID)
            thread = thread_payload(int(parts[3]), body["name"], parent_id=int(parts[1]), owner=BOT, guild_id=guild_id)
            self.threads[int(thread["id"])] = thread
            self.guild_of[int(thread["id"])] = guild_id
            await self.dispatch("THREAD_CREATE", {**thread, "newly_created": True})
            return _json(thread, status=201)
        if request.method == "DELETE" and parts[0] == "channels" and len(parts) == 2:
            thread = self.threads.pop(int(parts[1]), None)
            if thread is None:
                return _json({"message": "Unknown Channel", "code": 10003}, status=404)
            await self.dispatch("THREAD_DELETE", {key: thread[key] for key in ("id", "type", "guild_id", "parent_id")})
            return _json(thread)
        return self._answer(request.method, parts, body)

    def _answer(self, method: str, parts: list[str], body: Any) -> web.StreamResponse:
        if method == "GET" and parts == ["users", "@me"]:
            return _json({**BOT.payload(), "mfa_enabled": False, "locale": "en-US"})
        if method == "GET" and parts == ["gateway", "bot"]:
            return _json({
                "url": self.gateway_url, "shards": self.recommended_shards,
                "session_start_limit": {
                    "total": 1000, "remaining": 1000 - self.identified, "reset_after": 86_400_000,
                    "max_concurrency": self.max_concurrency,
                },
            })
        if method == "GET" and parts == ["oauth2", "applications", "@me"]:
            return _json({
                "id": str(APPLICATION_ID), "name": "Llama", "description": "", "icon": None, "bot_public": True,
                "bot_require_code_grant": False, "owner": FakeUser(OWNER_ID, "Owner").payload(),
                "verify_key": "0" * 64, "flags": self.application_flags, "flags_new": str(self.application_flags),
                "interactions_endpoint_url": None, "type": None, "redirect_uris": [], "role_connections_verification_url": None,
                "approximate_guild_count": len(self.guild_permissions), "approximate_user_install_count": 0,
                "approximate_user_authorization_count": 0, "explicit_content_filter": 0, "team": None,
                "eligible_oauth2_scopes": ["bot", "applications.commands"],
            })
        if method == "GET" and parts == ["users", "@me", "guilds"]:
            return _json([
                {"id": str(guild_id), "name": "Test guild" if guild_id == GUILD_ID else f"Guild {guild_id}", "icon": None,
                 "banner": None, "owner": False, "permissions": str(permissions), "features": []}
                for guild_id, permissions in self.guild_permissions.items()
            ])
        if method == "PUT" and parts[0] == "applications" and parts[-1] == "commands":
            guild = {"guild_id": parts[3]} if "guilds" in parts else {}
            return _json([
                {"id": str(self.next_id()), "application_id": str(APPLICATION_ID), "version": "1", **guild,
                 **{key: value for key, value in command.items() if value is not None},
                 "default_member_permissions": command.get("default_member_permissions") and str(command["default_member_permissions"])}
                for command in body
            ])
        if method == "POST" and parts[0] == "channels" and parts[2:] == ["typing"]:
            return web.Response(status=204)
        if method == "POST" and parts[0] == "channels" and parts[2:] == ["messages"] and int(parts[1]) in self.forbidden:
            return _json({"message": "Missing Permissions", "code": 50013}, status=403)
        if method == "POST" and parts[0] == "channels" and parts[2:] == ["messages"]:
            reference = (body.get("message_reference") or {}).get("message_id")
            message = BotMessage(self.next_id(), int(parts[1]), [body["content"]], int(reference) if reference else None)
            message.times.append(time.monotonic())
            message.components.append(body.get("components") or [])
            self.bot_messages[message.id] = message
            return _json(self._message_payload(message))
        if method == "PATCH" and parts[0] == "channels" and parts[2] == "messages":
            message = self.bot_messages.get(int(parts[3]))
            if message is None:
                return _json({"message": "Unknown Message", "code": 10008}, status=404)
            message.contents.append(body.get("content", message.text))
            message.times.append(time.monotonic())
            # An edit without components keeps those the message had.
            message.components.append(body.get("components", message.components[-1] if message.components else []))
            return _json(self._message_payload(message))
        if method == "DELETE" and parts[0] == "channels" and parts[2] == "messages":
            if self.bot_messages.pop(int(parts[3]), None) is None:
                return _json({"message": "Unknown Message", "code": 10008}, status=404)
            return web.Response(status=204)
        if method == "POST" and parts[0] == "interactions" and parts[-1] == "callback":
            if parts[1] in self.answered:
                return _json(ALREADY_ACKNOWLEDGED, status=400)
            self.answered.add(parts[1])
            kind = self.interactions.get(parts[1], {}).get("type", 2)
            return _json({"interaction": {"id": parts[1], "type": kind}})
        return _json({"message": "404: Not Found", "code": 0}, status=404)

    def _message_payload(self, message: BotMessage) -> dict[str, Any]:
        return {
            "id": str(message.id), "channel_id": str(message.channel_id), "type": 19 if message.reply_to else 0,
            "content": message.text, "author": BOT.payload(), "timestamp": TIMESTAMP, "edited_timestamp": None,
            "tts": False, "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [],
            "embeds": [], "pinned": False, "flags": 0,
            "components": _numbered(message.components[-1]) if message.components else [],
            # discord.py reads a reply's reference from here (a button's click carries its message).
            **({"message_reference": {"type": 0, "message_id": str(message.reply_to), "channel_id": str(message.channel_id)}}
               if message.reply_to else {}),
        }
