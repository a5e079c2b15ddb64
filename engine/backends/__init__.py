"""Model backends behind one interface; load_backend picks one from the settings."""

from __future__ import annotations

from engine.backends.base import Backend
from engine.config import ModelSettings


def load_backend(settings: ModelSettings) -> Backend:
    if settings.backend == "neuron":
        from engine.backends.neuron import NeuronBackend

        return NeuronBackend.load(settings)
    from engine.backends.transformers_backend import TransformersBackend

    return TransformersBackend.load(settings)


__all__ = ["Backend", "load_backend"]
