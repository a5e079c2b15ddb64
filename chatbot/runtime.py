"""Process wiring shared by the commands: settings, logs, Redis (the configured one or an embedded one), /metrics."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

from redis.asyncio import Redis

from contract.schema import check_schema
from service.config import ConfigError, Secrets, Settings, load_settings
from service.logs import setup_logging
from service.observability import HEALTH, redis_check, serving
from service.process import Stuck
from service.redis_client import connect, with_backoff
from service.redis_server import RedisServer

log = logging.getLogger(__name__)
# Exit status of a worker whose model stopped answering (queue.step_timeout_s): restart it.
EXIT_MODEL_STUCK = 3


def startup(config_path: str | None) -> tuple[Settings, Secrets]:
    settings = load_settings(config_path)
    secrets = Secrets.from_env()
    setup_logging(settings.log_level, list(secrets.values.values()))
    return settings, secrets


def log_to_file(settings: Settings, secrets: Secrets) -> Path:
    path = settings.run_dir / "chatbot.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    setup_logging(settings.log_level, list(secrets.values.values()), stream=path.open("a"))
    return path

def one_shot_client(config_path: str | None) -> tuple[Settings, Redis]:
    settings, secrets = startup(config_path)
    # A one-shot command speaks to the terminal in sentences; details go to the log file.
    log_to_file(settings, secrets)
    url, _ = redis_url(settings, start_embedded=False)
    return settings, connect(url)



def _url_file(settings: Settings) -> Path:
    return settings.run_dir / "redis.url"


def redis_url(settings: Settings, start_embedded: bool) -> tuple[str, RedisServer | None]:
    """REDIS_URL if set; else the embedded server another chatbot process runs; else start one (if allowed).

    Returns the URL and the server this call started, which the caller stops.
    """
    if settings.redis_url:
        return settings.redis_url, None
    url_file = _url_file(settings)
    if url_file.exists():
        url = url_file.read_text().strip()
        try:
            import redis

            redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
            return url, None
        except redis.ConnectionError:
            url_file.unlink()
    if not start_embedded:
        raise ConfigError("no REDIS_URL is set and no embedded Redis is running: start `chatbot demo` first, or set REDIS_URL")
    server = RedisServer(settings.run_dir / "redis").start()
    url_file.write_text(server.url)
    return server.url, server


def stop_embedded(settings: Settings, server: RedisServer | None) -> None:
    if server:
        _url_file(settings).unlink(missing_ok=True)
        server.stop()


def serve(settings: Settings, main, start_embedded: bool = True) -> int:
    """Run `main(redis)` against the configured or embedded Redis, stopping what this process started."""
    url, server = redis_url(settings, start_embedded)

    async def _run() -> None:
        redis = connect(url)
        try:
            await with_backoff(lambda: check_schema(redis), "schema check")
            with HEALTH.checking("redis", redis_check(redis)):
                async with serving(HEALTH, settings.metrics.port):
                    await main(redis)
        except Stuck as error:
            # The stuck model call holds a thread that nothing can stop, and a normal exit would wait
            # for it forever: leave at once (an embedded redis-server dies with this process).
            log.critical("model stuck, exiting", extra={"error": str(error), "exit_status": EXIT_MODEL_STUCK})
            print(f"chatbot: {error}", file=sys.stderr)
            logging.shutdown()
            os._exit(EXIT_MODEL_STUCK)
        finally:
            await redis.aclose()

    try:
        asyncio.run(_run())
    finally:
        stop_embedded(settings, server)
    return 0
