"""Upload a compiled model folder to the Hugging Face Hub, so that inf2 hosts load it without compiling."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi

from engine.neuron.progress import HEARTBEAT_S, stage
from engine.neuron.sdk import NeuronError, hub_errors

log = logging.getLogger(__name__)

# What `chatbot export` writes and NeuronModelForCausalLM.from_pretrained reads first.
COMPILED_FILES = ("config.json", "neuron_config.json", "model.pt")


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    url: str


def push(folder: Path, repo_id: str | None = None) -> PushResult:
    """Upload `folder` to `repo_id` (default: <your user>/<folder name>), creating it private if new."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise NeuronError("push needs a Hugging Face token with write access in the HF_TOKEN environment variable, which is not set")
    missing = [name for name in COMPILED_FILES if not (folder / name).is_file()]
    if missing:
        raise NeuronError(f"{folder} is not a compiled model folder (no {', '.join(missing)}): run `chatbot export` first")
    api = HfApi(token=token)
    if repo_id is None:
        with hub_errors("look up the HF_TOKEN user on the Hugging Face Hub"):
            repo_id = f"{api.whoami()['name']}/{folder.resolve().name}"
    with hub_errors(f"upload to {repo_id}"):
        # Private by default: a Llama 2 derivative is published only by choice, on the Hub page.
        api.create_repo(repo_id, private=True, exist_ok=True)
        with stage("upload", heartbeat_s=HEARTBEAT_S, repo_id=repo_id, folder=str(folder)):
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"Upload {folder.name} compiled for Inferentia2")
    log.info("uploaded", extra={"repo_id": repo_id, "commit": commit.oid})
    return PushResult(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")
