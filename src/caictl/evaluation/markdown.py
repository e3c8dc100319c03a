"""Markdown for the reports the eval commands write: tables and figures, one way everywhere."""

from __future__ import annotations


def table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table's lines, and the blank line after it."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows] + [""]


def number(value) -> str:
    """Three decimals; "-" for a figure that could not be measured."""
    return "-" if value is None else f"{value:.3f}"
