"""Serving the model: slots and admission (scheduler), and the engines that run them (transformers, Neuron)."""

from __future__ import annotations

from engine.serving.engine import Engine
from service.config import Settings


def load_engine(settings: Settings) -> Engine:
    if settings.model.backend == "neuron":
        from engine.serving.neuron_engine import NeuronEngine

        return NeuronEngine.load(settings.model, settings.generation)
    from engine.serving.transformers_engine import TransformersEngine

    return TransformersEngine.load(settings.model, settings.generation)


__all__ = ["Engine", "load_engine"]
