"""Running coroutines side by side, and stopping them for sure."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable


async def cancel_until_done(tasks: Iterable[asyncio.Task]) -> None:
    """Cancel tasks and wait until they have ended.

    On Python 3.11, asyncio.wait_for (redis-py sends every command through it) loses a
    cancellation that lands just as the wrapped call completes, and the task carries on:
    so cancel again until it ends. (Fixed in Python 3.12.)
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)


async def until_first_ends(*awaitables: Awaitable[None]) -> None:
    """Run together; when one returns or fails, stop the others and pass its error on."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_until_done(tasks)
    for task in done:
        task.result()
