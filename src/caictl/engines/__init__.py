"""Engines by name. Each module imports its heavy dependencies only when an engine is made."""

from __future__ import annotations

import inspect

from caictl.engines.base import Engine, Generation, SamplingParams
from caictl.errors import UsageError

ENGINES = ("hf", "openai")


def load_engine(name: str, model: str, **options) -> Engine:
    """Make the engine `name` for `model`. Options are the engine's own (batch_size, base_url, ...); one it
    does not take is refused by name before anything loads."""
    if name == "hf":
        from caictl.engines.hf import HFEngine as engine_class
    elif name == "openai":
        from caictl.engines.openai import OpenAIEngine as engine_class
    else:
        raise UsageError(f"unknown engine {name!r}; known engines: {', '.join(ENGINES)}")
    known = [p for p in inspect.signature(engine_class).parameters if p != "model"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UsageError(f"engine {name!r} takes no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(known)}")
    return engine_class(model, **options)


def sampler(name: str) -> str:
    """What draws sampled tokens on engine `name`, for a sampling stage's resume settings: from the same seed,
    another sampler writes other text. A server samples with its own."""
    if name == "hf":
        from caictl.engines.sampling import SAMPLER

        return SAMPLER
    return "server"


__all__ = ["ENGINES", "Engine", "Generation", "SamplingParams", "load_engine", "sampler"]
