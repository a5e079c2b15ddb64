"""Progress of long, silent steps (a compile takes about an hour): start, a heartbeat, end, elapsed time."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0


def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


@contextmanager
def stage(name: str, heartbeat_s: float | None = None, **fields) -> Iterator[None]:
    """Log the start and end of `name`; while it runs, log a line every `heartbeat_s` so it never looks hung."""
    started = time.monotonic()
    log.info("%s: started", name, extra={"stage": name, **fields})
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            elapsed = time.monotonic() - started
            log.info("%s: still running, %s elapsed", name, clock(elapsed), extra={"stage": name, "elapsed_s": round(elapsed)})

    beating = threading.Thread(target=beat, name=f"heartbeat-{name}", daemon=True) if heartbeat_s else None
    if beating:
        beating.start()
    try:
        yield
    except BaseException:
        elapsed = time.monotonic() - started
        log.error("%s: failed after %s", name, clock(elapsed), extra={"stage": name, "elapsed_s": round(elapsed, 1)})
        raise
    finally:
        stop.set()
        if beating:
            beating.join()
    elapsed = time.monotonic() - started
    log.info("%s: done in %s", name, clock(elapsed), extra={"stage": name, "elapsed_s": round(elapsed, 1)})
