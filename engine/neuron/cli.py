"""Neuron commands: `plan` a model's fit on inf2, `export` (compile) it, `push` the result to the Hub.

Heavy imports (optimum.neuron, torch, huggingface_hub) happen inside the handlers, so that
building the `chatbot` parser stays cheap everywhere.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from engine.neuron.plan import DTYPE_BYTES, INSTANCE_CORES, TP_DEGREES, PlanRefused, format_plan, make_plan, read_config
from engine.neuron.sdk import NeuronError

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def register(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser("plan", help="will a model fit on inf2 NeuronCores, and on how many (config.json arithmetic)")
    plan.add_argument("model", help="a folder or config.json, a bundled config (llama-2-7b, llama-2-13b, llama-2-70b) or a Hub id")
    _shape_arguments(plan, required=False)
    plan.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="default: the checkpoint's torch_dtype")
    plan.set_defaults(handler=plan_command)

    export = commands.add_parser("export", help="compile a checkpoint for inf2 (needs the Neuron SDK; about an hour)")
    export.add_argument("model", help="a checkpoint folder or a Hub id, e.g. meta-llama/Llama-2-13b-chat-hf")
    export.add_argument("output_dir", type=Path, help="new folder for the compiled model")
    _shape_arguments(export, required=True)
    export.set_defaults(handler=export_command)

    push = commands.add_parser("push", help="upload a compiled model folder to the Hugging Face Hub (token from HF_TOKEN)")
    push.add_argument("output_dir", type=Path, help="the folder `chatbot export` wrote")
    push.add_argument("--repo-id", type=_repo_id, help="ORG/NAME (default: <your user>/<folder name>)")
    push.set_defaults(handler=push_command)


def _shape_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    # What export compiles in is fixed; config.yaml must repeat it (in parentheses), the worker checks.
    parser.add_argument("--batch-size", type=_positive, required=required, default=None if required else 1,
                        help="prompts generated together (model.batch_size)")
    parser.add_argument("--sequence-length", type=_positive, required=required,
                        help="prompt + answer tokens (model.sequence_length); plan's default: the model's context, at most 4096")
    parser.add_argument("--cores", "--num-cores", dest="cores", type=int, choices=TP_DEGREES, required=required, metavar="N",
                        help=f"NeuronCores, one of {', '.join(map(str, TP_DEGREES))} (model.tensor_parallel_size); "
                        "plan's default: the fewest that fit")
    parser.add_argument("--instance", choices=list(INSTANCE_CORES), help="limit to the NeuronCores of this instance size")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _repo_id(text: str) -> str:
    if not REPO_ID.match(text):
        raise argparse.ArgumentTypeError(f"expected ORG/NAME, got {text!r}")
    return text


def _fail(message: object) -> int:
    print(f"chatbot: {message}", file=sys.stderr)
    return 1


def plan_command(args: argparse.Namespace) -> int:
    try:
        config, source = read_config(args.model)
        plan = make_plan(config, model=args.model, source=source, batch_size=args.batch_size, sequence_length=args.sequence_length,
                         instance=args.instance, cores=args.cores, dtype=args.dtype)
    except NeuronError as error:
        return _fail(error)
    print(format_plan(plan))
    return 0 if plan.fits else _fail(f"refused: {args.model} {plan.verdict}")


def _setup_logging() -> None:
    from service.config import Secrets
    from service.logs import setup_logging

    setup_logging("INFO", list(Secrets.from_env().values.values()))


def export_command(args: argparse.Namespace) -> int:
    from engine.neuron.export import ExportRequest, export

    request = ExportRequest(args.model, args.output_dir, args.batch_size, args.sequence_length, args.cores, args.instance)
    try:
        _setup_logging()
        plan = export(request)
    except PlanRefused as refused:
        print(format_plan(refused.plan))
        return _fail(f"refused: {refused}")
    except NeuronError as error:
        return _fail(error)
    print(f"compiled {args.model} for {plan.cores} NeuronCores into {args.output_dir}: set model.id to it (or `chatbot push` it), "
          f"model.backend: neuron, batch_size: {args.batch_size}, sequence_length: {args.sequence_length}, "
          f"tensor_parallel_size: {args.cores}")
    return 0


def push_command(args: argparse.Namespace) -> int:
    from engine.neuron.push import push

    try:
        _setup_logging()
        result = push(args.output_dir, args.repo_id)
    except NeuronError as error:
        return _fail(error)
    print(f"pushed {args.output_dir} to {result.url}: set model.id to {result.repo_id} on the inf2 host")
    return 0
