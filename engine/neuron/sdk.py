"""The Neuron tooling's errors for the operator: is the AWS Neuron SDK here, and Hub failures as one sentence.

The SDK is checked before optimum.neuron is imported, which otherwise fails deep inside.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

from service.config import ConfigError

# What compiling and running on NeuronCores needs beyond optimum-neuron itself
# (optimum-neuron 0.4.5 pins them in its `neuronx` extra: Neuron SDK 2.26).
SDK_MODULES = ("neuronx_distributed", "torch_neuronx", "neuronxcc", "optimum.neuron")

INSTALL_HINT = (
    "run it on an inf2 instance with the Neuron DLAMI or in the docker/worker.Dockerfile image, "
    "or install the SDK with `pip install optimum-neuron[neuronx]==0.4.5 "
    "--extra-index-url https://pip.repos.neuron.amazonaws.com`"
)


class NeuronError(ConfigError):
    """A Neuron tooling problem worded for the operator as one sentence.

    A ConfigError, so that `chatbot` prints it as one line instead of a traceback
    when the worker hits it.
    """


def reason(error: BaseException) -> str:
    """The first line of an error from a library (Hub errors run to many lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def hub_errors(action: str, hint: str = "") -> Iterator[None]:
    """Raise NeuronError "cannot <action> (<reason>)[; <hint>]" for what the Hugging Face Hub client raises.

    huggingface_hub's errors (offline, unauthorized, gated, missing) all derive from OSError or ValueError.
    """
    try:
        yield
    except (OSError, ValueError) as error:
        raise NeuronError(f"cannot {action} ({reason(error)})" + (f"; {hint}" if hint else "")) from None


def _present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent package of a dotted name is missing
        return False


def missing_modules() -> list[str]:
    return [name for name in SDK_MODULES if not _present(name)]


def require_sdk(action: str) -> None:
    """Raise NeuronError naming what is missing, before anything imports optimum.neuron."""
    missing = missing_modules()
    if missing:
        raise NeuronError(f"{action} needs the AWS Neuron SDK, which is not installed here (missing {', '.join(missing)}): {INSTALL_HINT}")
