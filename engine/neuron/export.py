"""Compile a checkpoint for Inferentia2 with optimum-neuron and save a folder the worker loads as is."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from engine.neuron.plan import Plan, PlanRefused, bundled_configs, make_plan, read_config
from engine.neuron.progress import HEARTBEAT_S, stage
from engine.neuron.sdk import NeuronError, hub_errors, reason, require_sdk

log = logging.getLogger(__name__)

# Enough to compile and to rebuild the tokenizer; skips the duplicate .bin weights Llama repos carry.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer.model"]
# optimum-neuron's name for the inf2 family (it compiles for the trn1 target, which inf2 shares)
INSTANCE_FAMILY = "inf2"


@dataclass(frozen=True)
class ExportRequest:
    model: str  # a checkpoint folder or a Hub id
    output_dir: Path
    batch_size: int
    sequence_length: int
    cores: int
    instance: str | None = None  # for the plan only: checks the cores exist there


def export(request: ExportRequest) -> Plan:
    """Plan, then compile and save to request.output_dir; returns the plan it ran under."""
    require_sdk("export")
    if request.model in bundled_configs() and not Path(request.model).exists():
        raise NeuronError(
            f"{request.model} is a bundled config for `chatbot plan` only: export needs a checkpoint folder "
            "or a Hub id such as meta-llama/Llama-2-13b-chat-hf"
        )
    config, source = read_config(request.model)
    plan = make_plan(
        config,
        model=request.model,
        source=source,
        batch_size=request.batch_size,
        sequence_length=request.sequence_length,
        instance=request.instance,
        cores=request.cores,
    )
    if not plan.fits:
        raise PlanRefused(plan)
    log.info("plan: %s", plan.verdict, extra={"model": request.model, "cores": plan.cores})
    _prepare_output_dir(request.output_dir)

    checkpoint = local_checkpoint(request.model)
    from optimum.neuron import NeuronModelForCausalLM
    from transformers import AutoTokenizer

    shape = {"batch_size": request.batch_size, "sequence_length": request.sequence_length, "cores": request.cores}
    with stage("compile", heartbeat_s=HEARTBEAT_S, model=request.model, **shape):
        neuron_config = NeuronModelForCausalLM.get_neuron_config(
            str(checkpoint),
            batch_size=request.batch_size,
            sequence_length=request.sequence_length,
            tensor_parallel_size=request.cores,
            instance_type=INSTANCE_FAMILY,
        )
        # Weights are not loaded onto NeuronCores here: saving does not need them, and the host
        # then need not have the cores the model will run on.
        model = NeuronModelForCausalLM.export(str(checkpoint), neuron_config, load_weights=False)
    with stage("save", heartbeat_s=HEARTBEAT_S, output_dir=str(request.output_dir)):
        # Exported from a local folder, save_pretrained also writes the weights sharded per core,
        # so the folder loads without the original checkpoint or the Hub.
        model.save_pretrained(str(request.output_dir))
        AutoTokenizer.from_pretrained(checkpoint).save_pretrained(str(request.output_dir))
    return plan


def _prepare_output_dir(output_dir: Path) -> None:
    # Checked before the download and the hour of compiling, not after.
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise NeuronError(f"{output_dir} already exists and is not an empty folder: choose a new OUTPUT_DIR or remove it")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NeuronError(f"cannot create {output_dir}: {reason(error)}") from None


def local_checkpoint(model: str) -> Path:
    """The checkpoint as a local folder, downloading a Hub id (HF_TOKEN is used for gated repos)."""
    if Path(model).is_dir():
        return Path(model)
    if Path(model).exists():
        raise NeuronError(f"{model} is a file: export needs the checkpoint's folder (config.json, weights, tokenizer)")
    from huggingface_hub import snapshot_download

    gated = "gated models such as meta-llama/* need HF_TOKEN set to a token with access"
    with stage("download", heartbeat_s=HEARTBEAT_S, model=model), hub_errors(f"download {model} from the Hugging Face Hub", gated):
        return Path(snapshot_download(model, allow_patterns=CHECKPOINT_FILES))
