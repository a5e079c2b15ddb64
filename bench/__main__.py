"""`python -m bench [name ...]`: run the benchmarks, print markdown tables for the README."""

from __future__ import annotations

import sys

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

BENCHMARKS = {
    "prompts": prompt_building.run, "queue": queue_overhead.run, "generation": generation_speed.run,
    "concurrency": concurrency.run, "decode_cost": decode_cost.run,
    "context_reuse": context_reuse.run, "peers": peers.run, "scale": scale.run,
}

if __name__ == "__main__":
    for name in sys.argv[1:] or BENCHMARKS:
        print(BENCHMARKS[name](), end="\n\n", flush=True)
