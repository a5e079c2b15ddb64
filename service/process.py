"""What every long-running process needs from the operating system: a unique identity, signals, a way out."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal


def process_identity(name: str) -> str:
    """Unique per process, `name` first: two processes on one host, or replicas sharing one env file,
    never take over each other's leases (a worker's jobs, an adapter's reply shards)."""
    return f"{name}-{os.getpid()}-{secrets.token_hex(3)}"


class Stuck(RuntimeError):
    """A call that nothing can stop holds a thread of the process: only exiting recovers it."""


def on_terminate(callback) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, callback)
