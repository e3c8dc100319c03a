"""Interleaved timing, shared by the benchmarks: the sides of a comparison take turns (A B A B ...) and every
ratio is the median of per-round ratios.

    seconds = interleave({"caictl": run_caictl, "baseline": run_baseline}, rounds=3)
    rates = throughputs(seconds, {"caictl": 64, "baseline": 8})
    ratios = ratio(seconds, {"caictl": 64, "baseline": 8}, "caictl", "baseline")  # ratio, ratio_min, ratio_max

On a shared machine the load changes over minutes: two phases measured minutes apart gave the same revise
benchmark 3.8x once and 47x another time. Sides that take turns see about the same load within a round, and
the median over rounds drops the round that a burst of load fell on.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Mapping


def timed(work: Callable[[], object]) -> float:
    """Seconds that one call of `work` takes."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def interleave(sides: Mapping[str, Callable[[], float]], rounds: int,
               warm_ups: Mapping[str, Callable[[], object]] | None = None) -> list[dict[str, float]]:
    """Seconds per side, one dict per round. A side does its work once and returns the seconds of the part it
    measures, so that set-up such as loading a fresh model stays outside (`timed` for the plain case).

    Every side is warmed up first, untimed, by its entry in `warm_ups` (the same code on less work) or else by
    one whole run: the first call pays for allocations and lazy initialisation that later calls do not."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    for name, side in sides.items():
        (warm_ups or {}).get(name, side)()
    seconds = []
    for index in range(rounds):
        seconds.append({name: side() for name, side in sides.items()})
        # Progress on stderr (stdout holds the one JSON line): a round can take minutes on a busy machine.
        print(f"round {index + 1}/{rounds}: " + ", ".join(f"{name} {s:.2f}s" for name, s in seconds[-1].items()),
              file=sys.stderr, flush=True)
    return seconds


def throughputs(seconds: list[dict[str, float]], work: Mapping[str, float]) -> dict[str, float]:
    """Median units of work per second for each side in `work` (units one run of that side does)."""
    return {name: statistics.median(units / r[name] for r in seconds) for name, units in work.items()}


def ratio(seconds: list[dict[str, float]], work: Mapping[str, float], side: str, baseline: str,
          key: str = "ratio") -> dict[str, float]:
    """side's throughput over baseline's within each round: the median as `key`, the extremes as `key`_min and
    `key`_max."""
    per_round = [(work[side] / r[side]) / (work[baseline] / r[baseline]) for r in seconds]
    return {key: round(statistics.median(per_round), 2), f"{key}_min": round(min(per_round), 2),
            f"{key}_max": round(max(per_round), 2)}
