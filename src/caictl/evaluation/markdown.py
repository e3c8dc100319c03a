"""Markdown for the reports the eval commands write: tables and figures, one way everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from caictl.models.kind import random_weights


def random_weights_warning(models: Iterable[str | Path | None]) -> list[str]:
    """The line a report opens with when a model it used has random weights (`caictl init-model` built it), and the
    blank line after it; nothing otherwise. Its figures are noise, which must not be the last thing a reader learns.
    Hub ids, server model names and None are skipped: only a local folder's caictl.json says so."""
    noisy = [model for model in dict.fromkeys(str(model) for model in models if model) if random_weights(model)]
    if not noisy:
        return []
    return [f"> Warning: random-weight model(s): {', '.join(noisy)} — figures are noise", ""]


def table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table's lines, and the blank line after it."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows] + [""]


def number(value) -> str:
    """Three decimals; "-" for a figure that could not be measured."""
    return "-" if value is None else f"{value:.3f}"
