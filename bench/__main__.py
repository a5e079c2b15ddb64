"""`python -m bench [name ...]` (`make bench`: all of them): run the benchmarks, print their tables, and
write each one's section of docs/benchmarks.md from this run's own output, with the command, the date
and the machine. The sections of benchmarks not run this time stay as their own last run wrote them."""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from pathlib import Path

from bench import (
    concurrency,
    context_reuse,
    decode_cost,
    generation_speed,
    peers,
    prompt_building,
    queue_overhead,
    scale,
)

PAGE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
BENCHMARKS = {
    "prompts": prompt_building.run, "queue": queue_overhead.run, "generation": generation_speed.run,
    "concurrency": concurrency.run, "decode_cost": decode_cost.run,
    "context_reuse": context_reuse.run, "peers": peers.run, "scale": scale.run,
}
HEAD = """# Benchmarks

Written by `make bench` (every benchmark, about 45 minutes on 2 cores) or `python -m bench NAME ...`
(those named): each section below is the output of its own latest run, with the command, the date
and the machine; nothing here is copied in by hand. The machines are noisy, so every figure comes
with a ratio against a baseline measured in the same run (each table's title names it): compare
ratios across runs, not raw times.
"""
SECTION = re.compile(r"<!-- bench:(\w+) -->\n.*?<!-- /bench:\1 -->", re.DOTALL)


def machine() -> str:
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")] if cpuinfo.exists() else []
    cpu = models[0] if models else platform.processor() or "an unnamed CPU"
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__}"


def section(name: str, output: str, seconds: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    took = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
    return (
        f"<!-- bench:{name} -->\n## {name}\n\n`python -m bench {name}`, run {stamp} on {machine()}, in {took}.\n\n"
        f"{output.strip()}\n<!-- /bench:{name} -->"
    )


def write_page(new: dict[str, str]) -> None:
    """The page with this run's sections, the others as they were (or a line saying how to fill them)."""
    old = {match.group(1): match.group(0) for match in SECTION.finditer(PAGE.read_text())} if PAGE.exists() else {}
    sections = [
        new.get(name) or old.get(name)
        or f"<!-- bench:{name} -->\n## {name}\n\nNot run yet: `python -m bench {name}` writes it.\n<!-- /bench:{name} -->"
        for name in BENCHMARKS
    ]
    PAGE.write_text(HEAD + "\n" + "\n\n".join(sections) + "\n")


def main(names: list[str]) -> int:
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"no benchmark {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    for name in names or BENCHMARKS:
        started = time.monotonic()
        output = BENCHMARKS[name]()
        print(output, end="\n\n", flush=True)
        # Written after each benchmark: a long run stopped halfway keeps what it measured.
        write_page({name: section(name, output, time.monotonic() - started)})
    print(f"written to {PAGE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
