"""The private redis-server never outlives the process that started it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_parent_takes_its_redis_server_along(tmp_path):
    code = (
        "import time; from service.redis_server import RedisServer; "
        f"server = RedisServer({str(tmp_path)!r}).start(); print(server.process.pid, flush=True); time.sleep(60)"
    )
    with subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True) as parent:
        redis_pid = int(parent.stdout.readline())
        assert running(redis_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    deadline = time.monotonic() + 10
    while running(redis_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(redis_pid)
