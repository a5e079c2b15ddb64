"""Serving the model: slots and admission (scheduler), and the engines that run them (transformers, Neuron, an OpenAI-compatible server)."""

from __future__ import annotations

from engine.serving.engine import Engine
from service.config import Secrets, Settings


def load_engine(settings: Settings) -> Engine:
    if settings.model.backend == "neuron":
        from engine.serving.neuron_engine import NeuronEngine

        return NeuronEngine.load(settings.model, settings.generation)
    if settings.model.backend == "openai":
        from engine.serving.openai_engine import OpenAIEngine

        return OpenAIEngine.load(settings, Secrets.from_env().get("OPENAI_API_KEY"))
    from engine.serving.transformers_engine import TransformersEngine

    return TransformersEngine.load(settings.model, settings.generation)


__all__ = ["Engine", "load_engine"]
