"""`chatbot` command line: one entry point for the worker, the adapters, local chat and model tooling."""

from __future__ import annotations

import argparse
import sys

from engine.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from engine import cli as engine_cli
    from engine.neuron import cli as neuron_cli

    parser = argparse.ArgumentParser(prog="chatbot", description=__doc__)
    parser.add_argument("--config", help="path to config.yaml (default: $CHATBOT_CONFIG or ./config.yaml)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    engine_cli.register(commands)
    neuron_cli.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except ConfigError as error:
        print(f"chatbot: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
