"""Discord's REST API as Discord publishes it (discord/discord-api-spec), for holding the fake Discord to it.

The npm package discord-api-spec repackages the OpenAPI description as zod schemas; tests/discord_api pins it
(and zod) and runs them. ROUTES are the routes the bot uses, each with the schema of its request body and of
each answer, as the package's `Paths` (build/discord-api-spec.ts) names them. Every exchange the fake Discord
had is checked when it stops: the adapter's request bodies (discord.py's, for our calls) and the fake's answers.
The gateway is not described there, so its events are not checked.
"""

from __future__ import annotations

import atexit
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VALIDATOR = Path(__file__).parents[1] / "discord_api"
ERRORS = {429: "RatelimitedResponseSchema"}  # and any other 4xx: ErrorResponseSchema


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # as the spec writes it, e.g. /channels/{channel_id}/messages
    body: str | None  # the request body's schema; None: no body
    answers: dict[int, str | None]  # status -> the answer's schema; None: no body (or the spec describes none)

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and path_matches(self.path, path)


def path_matches(spec_path: str, path: str) -> bool:
    """Whether `path` is one of `spec_path`'s, whose {parameters} stand for any one segment."""
    pattern = "/".join("[^/]+" if part.startswith("{") else re.escape(part) for part in spec_path.split("/"))
    return re.fullmatch(pattern, path) is not None


def _array(schema: str) -> str:
    return f"{schema}[]"


ROUTES = [
    Route("GET", "/users/@me", None, {200: "UserPIIResponseSchema"}),
    Route("GET", "/gateway/bot", None, {200: "GatewayBotResponseSchema"}),
    Route("GET", "/oauth2/applications/@me", None, {200: "PrivateApplicationResponseSchema"}),
    Route("GET", "/users/@me/guilds", None, {200: _array("MyGuildResponseSchema")}),
    Route("PUT", "/applications/{application_id}/commands", _array("ApplicationCommandUpdateRequestSchema"),
          {200: _array("ApplicationCommandResponseSchema")}),
    Route("PUT", "/applications/{application_id}/guilds/{guild_id}/commands", _array("ApplicationCommandUpdateRequestSchema"),
          {200: _array("ApplicationCommandResponseSchema")}),
    Route("POST", "/channels/{channel_id}/typing", None, {200: "TypingIndicatorResponseSchema", 204: None}),
    Route("POST", "/channels/{channel_id}/messages", "MessageCreateRequestSchema", {200: "MessageResponseSchema"}),
    Route("PATCH", "/channels/{channel_id}/messages/{message_id}", "MessageEditRequestPartialSchema",
          {200: "MessageResponseSchema"}),
    Route("DELETE", "/channels/{channel_id}/messages/{message_id}", None, {204: None}),
    Route("POST", "/channels/{channel_id}/messages/{message_id}/threads", "CreateTextThreadWithMessageRequestSchema",
          {201: "ThreadResponseSchema"}),
    Route("DELETE", "/channels/{channel_id}", None, {200: None}),  # the spec describes no success answer
    Route(
        "POST", "/interactions/{interaction_id}/{interaction_token}/callback",
        "|".join(f"{kind}InteractionCallbackRequestSchema" for kind in ("CreateMessage", "UpdateMessage", "Modal", "Pong")),
        {200: "InteractionCallbackResponseSchema", 204: None},
    ),
]


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str  # without the API prefix
    body: Any  # the request's JSON body, None without one
    status: int
    answer: Any  # the answer's JSON body, None without one


def _snowflakes_as_strings(value: Any) -> Any:
    """discord.py writes the ids of a request's message_reference as JSON numbers; the spec's snowflakes are
    strings, and Discord takes both. So a request's integer ids are read as the strings they stand for."""
    if isinstance(value, dict):
        return {
            key: str(item) if (key == "id" or key.endswith("_id")) and isinstance(item, int) else _snowflakes_as_strings(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_snowflakes_as_strings(item) for item in value]
    return value


def _checks(exchange: Exchange) -> tuple[list[dict[str, Any]], list[str]]:
    """What to validate (schema names may end in [] for an array of them), and what is wrong already."""
    where = f"{exchange.method} {exchange.path}"
    route = next((route for route in ROUTES if route.matches(exchange.method, exchange.path)), None)
    if route is None:
        return [], [f"{where}: a route the bot is not known to use (add it to ROUTES, from the spec)"]
    checks, problems = [], []
    body = _snowflakes_as_strings(exchange.body)
    if route.body is None and exchange.body is not None:
        problems.append(f"{where}: a body where the spec takes none")
    elif route.body is not None:
        checks.append({"where": f"{where} request", "schemas": route.body.split("|"), "value": body})
    if exchange.status >= 400:
        schema = ERRORS.get(exchange.status, "ErrorResponseSchema")
        checks.append({"where": f"{where} answer {exchange.status}", "schemas": [schema], "value": exchange.answer})
    elif exchange.status not in route.answers:
        problems.append(f"{where}: answered {exchange.status}, the spec says {sorted(route.answers)}")
    elif (schema := route.answers[exchange.status]) is not None:
        checks.append({"where": f"{where} answer {exchange.status}", "schemas": [schema], "value": exchange.answer})
    return checks, problems


def spec_problems(exchanges: list[Exchange]) -> list[str]:
    """What in these exchanges Discord's published API does not allow."""
    checks, problems = [], []
    for exchange in exchanges:
        more_checks, more_problems = _checks(exchange)
        problems += more_problems
        for check in more_checks:
            # Arrays are checked item by item: a schema name ending in [] is the array of that schema.
            if check["schemas"][0].endswith("[]"):
                items = check["value"] if isinstance(check["value"], list) else [check["value"]]
                checks += [{**check, "where": f"{check['where']}[{n}]", "schemas": [check["schemas"][0][:-2]], "value": item}
                           for n, item in enumerate(items)]
            else:
                checks.append(check)
    if not checks:
        return problems
    return problems + _validate(checks)


_validator: subprocess.Popen | None = None


def _validate(checks: list[dict[str, Any]]) -> list[str]:
    """The problems node finds: one validator process for the whole session (loading the schemas is most of its cost)."""
    global _validator
    if _validator is None or _validator.poll() is not None:
        _validator = subprocess.Popen(
            ["node", "validate.mjs"], cwd=VALIDATOR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        atexit.register(_close, _validator)
    _validator.stdin.write(json.dumps(checks) + "\n")
    _validator.stdin.flush()
    answer = _validator.stdout.readline()
    assert answer, f"the validator stopped (exit status {_validator.wait(5)})"
    return json.loads(answer)


def _close(validator: subprocess.Popen) -> None:
    validator.stdin.close()
    validator.wait(10)
    validator.stdout.close()
