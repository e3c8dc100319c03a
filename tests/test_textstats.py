"""Refusal detector, boilerplate and distinct-n: the signs of Goodharting that need no model."""

from __future__ import annotations

import pytest

from caictl.evaluation.ratings import Outcome, elo, win_rates
from caictl.evaluation.textstats import boilerplate, distinct_n, is_refusal, response_stats


def test_refusals_are_caught_by_their_opening():
    assert is_refusal("I\u2019m sorry, but I can't help with that.")
    assert is_refusal("As an AI, I must decline.")
    assert is_refusal("   ")
    assert not is_refusal("Sure: preheat the oven to 200C and roast for 40 minutes.")
    assert not is_refusal("x " * 150 + "I cannot")  # past the opening window


def test_boilerplate_is_a_long_ngram_repeated_across_prompts():
    tail = "I hope this helps and please stay safe out there friend"
    responses = [f"Answer number {i} is about topic {i}. {tail}" for i in range(3)] + ["A plain reply with no tail."]
    flags, common = boilerplate(responses)
    assert flags == [True, True, True, False]
    assert common[0][1] == 3 and common[0][0] in tail.lower()
    assert response_stats(responses)["boilerplate_rate"] == 0.75
    assert boilerplate(responses[:2])[0] == [False, False]  # two prompts are not a pattern


def test_distinct_n_counts_unique_ngrams():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3, abs=1e-4)
    assert distinct_n([""], 2) is None


def test_elo_matches_the_win_rate():
    # 3 wins in 4 is an Elo gap of 400 * log10(3) = 190.8; the weak prior pulls it in slightly.
    outcomes = [Outcome(str(i), "x", "y", 0.0 if i % 4 == 0 else 1.0) for i in range(400)]
    ratings = elo(outcomes, ["y", "x"])
    assert ratings["y"]["elo"] == 0 and 185 < ratings["x"]["elo"] < 191
    assert ratings["x"]["ci"][0] < ratings["x"]["elo"] < ratings["x"]["ci"][1]
    rate, = win_rates(outcomes)
    assert rate["win_rate"] == 0.75 and rate["ci"][0] < 0.75 < rate["ci"][1]


def test_elo_stays_finite_for_a_clean_sweep_and_orders_three_models():
    outcomes = [Outcome(str(i), "a", "b", 1.0) for i in range(20)] + \
               [Outcome(str(i), "b", "c", 1.0) for i in range(20)] + [Outcome(str(i), "a", "c", 1.0) for i in range(20)]
    ratings = elo(outcomes, ["c", "b", "a"])
    assert 0 < ratings["b"]["elo"] < ratings["a"]["elo"] < 2000
