"""HTTP mode: bolt's aiohttp adapter served on a port, for operators behind a load balancer."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web
from slack_bolt.async_app import AsyncApp

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"  # the Request URL for events, slash commands and interactivity
HEALTH_PATH = "/healthz"  # for load balancer checks: Slack's path answers POST only


async def _healthy(_: web.Request) -> web.Response:
    return web.Response(text="ok")


@asynccontextmanager
async def http_server(app: AsyncApp, port: int, host: str = "0.0.0.0") -> AsyncIterator[None]:
    web_app = app.web_app(path=EVENTS_PATH, port=port)
    web_app.router.add_get(HEALTH_PATH, _healthy)
    runner = web.AppRunner(web_app)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("listening for slack requests", extra={"port": port, "path": EVENTS_PATH})
        yield
    finally:
        await runner.cleanup()
