"""caictl eval compare: every model answers, the PM and the judge compare them, per prompt set."""

from __future__ import annotations

import json

import pytest
from conftest import EXAMPLES, caictl, caictl_in_process, read_jsonl, write_jsonl

from caictl.data.constitution import load
from caictl.evaluation.ratings import share_of_win
from caictl.models.pm import Scorer, conversation_text
from caictl.stages import init_model as tiny


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    other = tiny.run(tiny.InitModelConfig(out=root / "other", preset="tiny", seed=1))
    pm = tiny.run(tiny.InitModelConfig(out=root / "pm", preset="tiny", task="seq-cls"))
    harmless = write_jsonl(root / "harmless.jsonl", read_jsonl(EXAMPLES / "held-out" / "harmless.jsonl")[:4])
    helpful = write_jsonl(root / "helpful.jsonl", read_jsonl(EXAMPLES / "held-out" / "helpful.jsonl")[:3])
    return root, other, pm, harmless, helpful


@pytest.mark.slow
def test_compare_scores_every_pair_per_set(setup, tiny_model):
    root, other, pm, harmless, helpful = setup
    out = root / "eval"
    caictl_in_process("eval", "compare", harmless, helpful, "--model", f"a={tiny_model}", "--model", f"b={other}",
                      "--pm", pm, "--judge", tiny_model, "--judge-refusal", "--set-constitution", "helpful=helpful",
                      "--max-new-tokens", "8", "-o", out)
    records = read_jsonl(out / "records.jsonl")
    assert len(records) == 2 * 7 and {r["set"] for r in records} == {"harmless", "helpful"}

    # Rewards are the PM's own scores of the conversation plus the response.
    first = records[0]
    prompt = read_jsonl(harmless)[0]["messages"]
    assert first["reward"] == pytest.approx(Scorer(pm).score([conversation_text(prompt, first["response"])])[0],
                                            abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sets"] == {"harmless": 4, "helpful": 3}
    # The PM win rate is the share of prompts where a's reward beats b's.
    reward = {(r["model"], r["set"], r["prompt_id"]): r["reward"] for r in records}
    for group, size in (("harmless", 4), ("helpful", 3), ("all", 7)):
        keys = [(s, p) for (m, s, p) in reward if m == "a" and group in ("all", s)]
        wins = sum(1.0 if reward[("a", *k)] > reward[("b", *k)] else 0.0 if reward[("a", *k)] < reward[("b", *k)]
                   else 0.5 for k in keys)
        rate, = summary["ratings"]["pm"][group]["win_rates"]
        assert (rate["a"], rate["b"], rate["comparisons"]) == ("a", "b", size)
        assert rate["win_rate"] == pytest.approx(wins / size, abs=1e-4)
        assert rate["ci"][0] <= rate["win_rate"] <= rate["ci"][1]
        elo = summary["ratings"]["pm"][group]["elo"]
        assert elo["a"]["elo"] == 0
        if rate["win_rate"] != 0.5:
            assert (elo["b"]["elo"] > 0) == (rate["win_rate"] < 0.5)

    # Judgements: both orders averaged, the principle recorded, the helpful set judged under the helpful
    # constitution as mapped.
    judgements = read_jsonl(out / "judgements.jsonl")
    assert len(judgements) == 7
    helpful_ids = {p.id for p in load("helpful").comparison}
    for j in judgements:
        assert j["p"] == pytest.approx((j["p_ab"] + j["p_ba"]) / 2)
        assert j["constitution"] == j["set"] and (j["principle"] in helpful_ids) == (j["set"] == "helpful")
    assert summary["set_constitutions"] == {"harmless": "harmless", "helpful": "helpful"}
    assert all(0 < r["judge_refusal"] < 1 for r in records)
    report = (out / "report.md").read_text()
    assert "## Preference model: Elo and win rates" in report and "| helpful | a | b |" in report
    for plot in ("elo.png", "winrates.png", "goodhart.png"):
        assert (out / plot).stat().st_size > 1000

    # A third model: only its answers are generated; the others stay as they were.
    before = (out / "responses.jsonl").read_text()
    third = tiny.run(tiny.InitModelConfig(out=root / "third", preset="tiny", seed=2))
    caictl_in_process("eval", "compare", harmless, helpful, "--model", f"a={tiny_model}", "--model", f"b={other}",
                      "--model", f"c={third}", "--pm", pm, "--max-new-tokens", "8", "-o", out)
    after = (out / "responses.jsonl").read_text()
    assert after.startswith(before) and len(after.splitlines()) == 3 * 7
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["ratings"]["pm"]["all"]["win_rates"]) == 3 and set(summary["ratings"]["pm"]["all"]["elo"]) == {
        "a", "b", "c"}


@pytest.mark.slow
def test_compare_one_model_and_refusals_of_bad_names(setup, tiny_model):
    root, other, pm, harmless, helpful = setup
    out = root / "renamed"
    caictl_in_process("eval", "compare", harmless, "--model", f"a={tiny_model}", "--pm", pm, "--max-new-tokens", "4",
                      "-o", out)
    summary = json.loads((out / "summary.json").read_text())  # one model: stats, but nothing to rate
    assert summary["ratings"] == {} and summary["per_model"]["harmless"]["a"]["responses"] == 4
    assert not (out / "elo.png").exists() and (out / "goodhart.png").exists()
    result = caictl("eval", "compare", harmless, "--model", f"a={other}", "--max-new-tokens", "4", "-o", out,
                    check=False)
    assert result.returncode == 2 and "another model folder under the same name" in result.stderr
    result = caictl("eval", "compare", harmless, "--model", f"x={tiny_model}", "--model", f"x={other}", "-o", out,
                    check=False)
    assert result.returncode == 2 and "the name 'x' is used twice" in result.stderr
    bad = root / "bad.jsonl"
    bad.write_text('{"id": "x", "messages": [{"role": "user", "content": "hi"}]}\n{"id": "y", "messages": \n')
    result = caictl("eval", "compare", bad, "--model", f"a={tiny_model}", "-o", root / "bad-out", check=False)
    assert result.returncode == 2 and "bad.jsonl:2" in result.stderr


@pytest.mark.slow
def test_a_model_compared_with_itself_ties_exactly(setup, tiny_model):
    root, other, pm, harmless, helpful = setup
    out = root / "itself"
    # Batches of 5 put the two copies of a response in batches of other widths, where the PM's rewards for the
    # same text differ in the last bits: that noise must not decide a win.
    caictl_in_process("eval", "compare", harmless, helpful, "--model", f"a={tiny_model}", "--model", f"b={tiny_model}",
                      "--pm", pm, "--batch-size", "5", "--max-new-tokens", "12", "-o", out)
    records = read_jsonl(out / "records.jsonl")
    response = {(r["model"], r["set"], r["prompt_id"]): r["response"] for r in records}
    assert all(response[("a", *key[1:])] == text for key, text in response.items() if key[0] == "b")
    summary = json.loads((out / "summary.json").read_text())
    for group in ("harmless", "helpful", "all"):
        rate, = summary["ratings"]["pm"][group]["win_rates"]
        assert rate["win_rate"] == 0.5 and rate["ci"] == [0.5, 0.5]
        assert summary["ratings"]["pm"][group]["elo"]["b"] == {"elo": 0, "ci": [0, 0]}


def test_rewards_within_a_millionth_tie():
    assert share_of_win(0.25, 0.25 + 5e-7) == 0.5 and share_of_win(-3000.0, -3000.002) == 0.5
    assert share_of_win(0.25, 0.25 + 2e-6) == 0.0 and share_of_win(-3000.0, -3000.004) == 1.0
