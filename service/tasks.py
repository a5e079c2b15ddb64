"""Running coroutines side by side, and stopping them for sure."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")
RECANCEL_S = 1.0  # how long a cancelled task has to end before it is cancelled again


async def cancel_until_done(tasks: Iterable[asyncio.Task]) -> None:
    """Cancel tasks and wait until they have ended, even if this wait is itself cancelled meanwhile (that
    cancellation is passed on once they have ended): a task never outlives the one that stops it.

    On Python 3.11, asyncio.wait_for (redis-py sends every command through it) loses a
    cancellation that lands just as the wrapped call completes, and the task carries on:
    so cancel again until it ends (fixed in Python 3.12). Not sooner than RECANCEL_S: a second
    cancellation interrupts the cleanup the first one started (slack-sdk closing the session of
    a call in a `finally`), which on a loaded machine can take longer than a tenth of a second.
    """
    pending = {task for task in tasks if not task.done()}
    cancelled = False
    while pending:
        for task in pending:
            task.cancel()
        try:
            _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


async def to_the_end(awaitable: Awaitable[T]) -> T:
    """Await to its end even if cancelled meanwhile, then pass the cancellation on: for short, bounded work
    that must not stop half done (a message the platform accepted whose id is not yet recorded)."""
    task = asyncio.ensure_future(awaitable)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: what the caller hears is its cancellation
        raise asyncio.CancelledError
    return task.result()


async def until_first_ends(*awaitables: Awaitable[None]) -> None:
    """Run together; when one returns or fails, stop the others and pass its error on."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_until_done(tasks)
    for task in done:
        task.result()
