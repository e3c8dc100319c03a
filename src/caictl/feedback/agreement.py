"""A labeller measured: against people's choices, against itself with the two responses swapped, and against
another labelling of the same pairs. Pure functions over a judge's votes, shared by `caictl eval labeler` and
`caictl constitution diff`.

A vote (caictl.feedback.judge.Judge.votes) holds P(first response better) as read in each order: p_ab with the first
response in slot A, p_ba with it in slot B. A Mode says how `caictl label` turns votes into a label: each order
clamped, the orders averaged (debias) or the first alone, the principles averaged, then rounded (hard). The
label is rebuilt here from the probabilities as read, so several modes come from one scoring pass: soft and
hard from one, chain of thought with and without the clamp from another.

A choice at P = 0.5 (within ratings.TIE_TOLERANCE) is a tie and counts half, so that a labeller whose pull
towards a slot cancels to 0.5 earns no agreement from whichever slot the people's choice happens to sit in.
"""

from __future__ import annotations

from dataclasses import dataclass

from caictl.evaluation.metrics import calibration
from caictl.evaluation.ratings import mean_interval, share_of_win
from caictl.evaluation.textstats import words
from caictl.feedback.judge import clamp


@dataclass(frozen=True)
class Mode:
    """One way of labelling, as `caictl label` options: --cot, --hard, --clamp LO HI, --debias."""

    name: str
    cot: bool = False
    hard: bool = False
    clamp: tuple[float, float] | None = None
    debias: bool = True


@dataclass
class Judged:
    """A comparison people made, with the labeller's votes on it (both orders read)."""

    votes: list[dict]
    first: str  # the response in slot A in the first order
    second: str
    human: int  # 0: people chose `first`; 1: `second`


def label_probability(votes: list[dict], mode: Mode) -> float:
    """P(first response better) as `caictl label` writes it under `mode` (its p_first): per vote the mean of
    the clamped orders (the first order alone without debias), averaged over the votes, rounded when hard."""
    per_vote = []
    for vote in votes:
        orders = [vote["p_ab"], vote["p_ba"]] if mode.debias else [vote["p_ab"]]
        per_vote.append(sum(clamp(p, mode.clamp) for p in orders) / len(orders))
    return _rounded(sum(per_vote) / len(per_vote), mode)


def order_probabilities(votes: list[dict], mode: Mode) -> tuple[float, float]:
    """P(first response better) from each order alone, the first response in slot A and then in slot B: each
    clamped, averaged over the votes, rounded when hard; the label one order would have given."""
    ab = sum(clamp(v["p_ab"], mode.clamp) for v in votes) / len(votes)
    ba = sum(clamp(v["p_ba"], mode.clamp) for v in votes) / len(votes)
    return _rounded(ab, mode), _rounded(ba, mode)


def _rounded(p: float, mode: Mode) -> float:
    if not mode.hard:
        return p
    return 1.0 if p >= 0.5 else 0.0  # as caictl label rounds: a tie goes to the first response


def side(p: float) -> float:
    """Which response a probability of `first` picks: 1 the first, 0 the second, 0.5 a tie."""
    return share_of_win(p, 0.5)


def measure(items: list[Judged], mode: Mode, seed: int) -> dict:
    """Overall (each comparison's label from all its votes) and per principle (each of its votes alone)."""
    per_principle: dict[str, list[Judged]] = {}
    for item in items:
        for vote in item.votes:
            per_principle.setdefault(vote["principle"], []).append(Judged([vote], item.first, item.second, item.human))
    return {"overall": statistics(items, mode, seed),
            "per_principle": {pid: statistics(judged, mode, seed) for pid, judged in sorted(per_principle.items())}}


def statistics(items: list[Judged], mode: Mode, seed: int) -> dict:
    """Agreement with people (accuracy, a bootstrap interval over comparisons), calibration of P(people's choice),
    position bias and length bias.

    Calibration counts each comparison from both sides: P(people's choice) with outcome 1 and 1 - P with outcome
    0, so predictions span [0, 1] and a labeller that always says 0.5 is calibrated (it knows it knows nothing).
    Position: the share of comparisons whose choice flips when the responses swap slots, and the mean P(slot A
    wins) over both orders (0.5: no pull). Length, in words, over the comparisons whose responses differ in
    length: how often the labeller prefers the longer response, and how often people did."""
    credits, predicted, observed, flips, slot_a, longer, people_longer = [], [], [], [], [], [], []
    for item in items:
        q = label_probability(item.votes, mode)
        p_people = q if item.human == 0 else 1 - q
        credits.append(side(p_people))
        predicted += [p_people, 1 - p_people]
        observed += [1.0, 0.0]
        ab, ba = order_probabilities(item.votes, mode)
        flips.append(abs(side(ab) - side(ba)))
        slot_a.append((ab + 1 - ba) / 2)  # P(slot A wins): p_ab, and 1 - p_ba with the first response in B
        first, second = len(words(item.first)), len(words(item.second))
        if first != second:
            longer_index = 0 if first > second else 1
            longer.append(side(q if longer_index == 0 else 1 - q))
            people_longer.append(1.0 if item.human == longer_index else 0.0)
    ece, bins = calibration(predicted, observed)
    low, high = mean_interval(credits, seed)
    return {"comparisons": len(items), "accuracy": _mean(credits), "accuracy_ci": [round(low, 4), round(high, 4)],
            "ece": round(ece, 4), "position_flip_rate": _mean(flips), "slot_a_preference": _mean(slot_a),
            "longer_preferred": _mean(longer), "human_longer_preferred": _mean(people_longer),
            "length_compared": len(longer), "reliability": bins}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None
