"""Win rates and Elo ratings from pairwise outcomes, with bootstrap confidence intervals.

An outcome is one prompt's comparison of two models: (prompt, a, b, score), where score is a's share of the
win in [0, 1] (1 a wins, 0 b wins, 0.5 a tie, or a judge's soft probability). Confidence intervals resample
prompts, so the outcomes of one prompt stay together. Elo ratings are a Bradley-Terry fit, P(a beats b) =
1 / (1 + 10 ** ((elo_b - elo_a) / 400)), with a weak prior that keeps a model that won everything finite;
the first model is anchored at 0, as the paper plots Elo differences.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95
PRIOR = 0.1  # L2 pull of the ratings towards each other, in natural-log-odds units
ELO_SCALE = 400 / math.log(10)
# Two scores this close (relative to max(1, |score|)) are equal: the same text scored in batches of other
# widths differs by ~1e-8 on CPU, and such noise must not decide a win.
TIE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Outcome:
    prompt: str
    a: str
    b: str
    score: float


def tied(a: float, b: float) -> bool:
    """Whether two scores are equal within TIE_TOLERANCE."""
    return abs(a - b) <= TIE_TOLERANCE * max(1.0, abs(a), abs(b))


def share_of_win(a: float, b: float) -> float:
    """Score a's share of the win over score b: 1 or 0, and 0.5 when they are tied."""
    if tied(a, b):
        return 0.5
    return 1.0 if a > b else 0.0


def win_rates(outcomes: list[Outcome], seed: int = 0) -> list[dict]:
    """Per pair of models: a's mean score over b, with a bootstrap interval over prompts."""
    pairs = sorted({(o.a, o.b) for o in outcomes})
    result = []
    for a, b in pairs:
        mine = [o for o in outcomes if (o.a, o.b) == (a, b)]
        lo, hi = _bootstrap(mine, lambda rows: sum(o.score for o in rows) / len(rows), seed)
        result.append({"a": a, "b": b, "comparisons": len(mine),
                       "win_rate": round(sum(o.score for o in mine) / len(mine), 4),
                       "ci": [round(lo, 4), round(hi, 4)]})
    return result


def elo(outcomes: list[Outcome], models: list[str], seed: int = 0) -> dict[str, dict]:
    """Per model: its Elo rating relative to models[0], and a bootstrap interval."""
    point = elo_points(outcomes, models)
    samples = _bootstrap_samples(outcomes, lambda rows: _fit(rows, models), seed)
    result = {}
    for name in models:
        values = sorted(s[name] for s in samples)
        result[name] = {"elo": point[name], "ci": [round(_quantile(values, (1 - CONFIDENCE) / 2), 1),
                                                              round(_quantile(values, (1 + CONFIDENCE) / 2), 1)]}
    return result


def elo_points(outcomes: list[Outcome], models: list[str]) -> dict[str, float]:
    """Per model: its Elo rating relative to models[0], without elo()'s bootstrap interval."""
    return {name: round(value, 1) for name, value in _fit(outcomes, models).items()}


def _fit(outcomes: list[Outcome], models: list[str], iterations: int = 500) -> dict[str, float]:
    """Bradley-Terry ratings by Newton steps on each rating in turn (the problem is small)."""
    index = {m: i for i, m in enumerate(models)}
    wins: dict[tuple[int, int], float] = {}
    games: dict[tuple[int, int], int] = {}
    for o in outcomes:
        i, j = index[o.a], index[o.b]
        wins[(i, j)] = wins.get((i, j), 0.0) + o.score
        wins[(j, i)] = wins.get((j, i), 0.0) + 1 - o.score
        games[(i, j)] = games.get((i, j), 0) + 1
        games[(j, i)] = games.get((j, i), 0) + 1
    r = [0.0] * len(models)
    for _ in range(iterations):
        largest = 0.0
        for i in range(len(models)):
            gradient, curvature = -PRIOR * r[i], PRIOR
            for (x, j), n in games.items():
                if x != i:
                    continue
                p = 1 / (1 + math.exp(r[j] - r[i]))
                gradient += wins[(i, j)] - n * p
                curvature += n * p * (1 - p)
            step = gradient / curvature
            r[i] += step
            largest = max(largest, abs(step))
        if largest < 1e-9:
            break
    return {m: (r[index[m]] - r[0]) * ELO_SCALE for m in models}


def mean_interval(values: list[float], seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval of the mean of independent values (a labeller's credit per comparison): each value is
    resampled alone."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(BOOTSTRAP_SAMPLES))
    return _quantile(means, (1 - CONFIDENCE) / 2), _quantile(means, (1 + CONFIDENCE) / 2)


def _bootstrap(outcomes: list[Outcome], statistic, seed: int) -> tuple[float, float]:
    values = sorted(_bootstrap_samples(outcomes, statistic, seed))
    return _quantile(values, (1 - CONFIDENCE) / 2), _quantile(values, (1 + CONFIDENCE) / 2)


def _bootstrap_samples(outcomes: list[Outcome], statistic, seed: int) -> list:
    by_prompt: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_prompt.setdefault(o.prompt, []).append(o)
    prompts = sorted(by_prompt)
    rng = random.Random(seed)
    samples = []
    for _ in range(BOOTSTRAP_SAMPLES):
        drawn = [o for _ in prompts for o in by_prompt[rng.choice(prompts)]]
        samples.append(statistic(drawn))
    return samples


def _quantile(values: list[float], q: float) -> float:
    position = q * (len(values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)
