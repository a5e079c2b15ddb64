"""Redis clients that ride out short outages."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, RedisError, TimeoutError

log = logging.getLogger(__name__)
T = TypeVar("T")
REDIS_DOWN = (ConnectionError, TimeoutError, OSError)
REDIS_FAILED = (*REDIS_DOWN, RedisError)  # down, or refusing writes (full, read-only)


def connect(url: str) -> Redis:
    return Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=3),
        retry_on_error=[ConnectionError, TimeoutError],
    )


async def with_backoff(
    operation: Callable[[], Awaitable[T]], what: str, give_up: Callable[[], bool] = lambda: False, cap_s: float = 5.0
) -> T:
    """Run `operation` until Redis answers, waiting longer after each failure, until `give_up()` says so."""
    delay = 0.1
    while True:
        try:
            return await operation()
        except REDIS_DOWN as error:
            if give_up():
                raise
            log.warning("redis unavailable, retrying", extra={"operation": what, "error": str(error), "retry_in_s": round(delay, 2)})
            await asyncio.sleep(delay)
            delay = min(cap_s, delay * 2) * (0.8 + 0.4 * random.random())


def after(seconds: float) -> Callable[[], bool]:
    """A give_up for with_backoff: true once `seconds` have passed."""
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() > deadline
