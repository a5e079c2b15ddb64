"""HTTP mode: bolt's aiohttp adapter served on a port, for operators behind a load balancer.

Requests are checked before bolt sees them: bolt parses the body before it verifies the
signature, and its verifier calls int() on the timestamp unguarded, so a malformed or
unsigned request would otherwise end in a 500 and a traceback. With many workspaces
(bot/slack/workspaces.py), bolt's server adds the install and OAuth redirect pages: people's
browsers reach them, unsigned.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web
from slack_bolt.async_app import AsyncApp
from slack_sdk.signature import SignatureVerifier

from service.observability import HEALTH, healthz

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"  # the Request URL for events, slash commands and interactivity
HEALTH_PATH = "/healthz"  # the process's health (service.observability), for load balancers


async def _health(_: web.Request) -> web.Response:
    return await healthz(HEALTH)


def refuse_unreadable(signing_secret: str):
    """Middleware: 400 for what cannot be a Slack request, 401 for what Slack did not sign."""
    verifier = SignatureVerifier(signing_secret)

    @web.middleware
    async def check(request: web.Request, handler):
        if request.path != EVENTS_PATH or request.method != "POST":
            return await handler(request)
        body = await request.read()
        timestamp = request.headers.get("X-Slack-Request-Timestamp")
        if timestamp is not None and not timestamp.isdigit():
            return _refused(request, 400, "malformed X-Slack-Request-Timestamp")
        if not timestamp or not verifier.is_valid(body, timestamp, request.headers.get("X-Slack-Signature", "")):
            return _refused(request, 401, "missing or invalid signature")
        try:
            text = body.decode("utf-8")
            if request.content_type == "application/json" and not isinstance(json.loads(text), dict):
                raise ValueError("not a JSON object")
        except ValueError as error:  # UnicodeDecodeError and JSONDecodeError included
            return _refused(request, 400, f"unreadable body: {error}")
        return await handler(request)

    return check


def _refused(request: web.Request, status: int, reason: str) -> web.Response:
    log.warning("slack request refused", extra={"status": status, "reason": reason, "remote": request.remote})
    return web.Response(status=status, text=reason)


@asynccontextmanager
async def http_server(app: AsyncApp, port: int, signing_secret: str, host: str = "0.0.0.0") -> AsyncIterator[None]:
    web_app = app.web_app(path=EVENTS_PATH, port=port)
    web_app.middlewares.append(refuse_unreadable(signing_secret))
    web_app.router.add_get(HEALTH_PATH, _health)
    runner = web.AppRunner(web_app)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("listening for slack requests", extra={"port": port, "path": EVENTS_PATH})
        if app.oauth_flow is not None:
            log.info("slack installs served", extra={"install": app.oauth_flow.install_path, "redirect": app.oauth_flow.redirect_uri_path})
        yield
    finally:
        await runner.cleanup()
