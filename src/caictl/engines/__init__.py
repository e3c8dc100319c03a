"""Engines by name. Each module imports its heavy dependencies only when an engine is made."""

from __future__ import annotations

from caictl.engines.base import Engine, Generation, SamplingParams
from caictl.errors import UsageError

ENGINES = ("hf", "openai")


def load_engine(name: str, model: str, **options) -> Engine:
    """Make the engine `name` for `model`. Options are the engine's own (batch_size, base_url, ...)."""
    if name == "hf":
        from caictl.engines.hf import HFEngine

        return HFEngine(model, **options)
    if name == "openai":
        from caictl.engines.openai import OpenAIEngine

        return OpenAIEngine(model, **options)
    raise UsageError(f"unknown engine {name!r}; known engines: {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "Generation", "SamplingParams", "load_engine"]
