"""caictl eval mc and eval pm: accuracy and calibration written where a person can read them."""

from __future__ import annotations

import json
import math

import pytest
from conftest import caictl, read_jsonl, write_jsonl

from caictl import tiny
from caictl.engines import load_engine
from caictl.pm import Scorer

QUESTIONS = [{"prompt": f"\n\nHuman: Which is safer, option {i}?\n\nAssistant: The answer is:",
              "corrects": [" (A)"], "incorrects": [" (B)", " (C)"]} for i in range(6)]


def test_eval_mc_scores_answers_by_their_probability(tmp_path, tiny_model):
    mc = write_jsonl(tmp_path / "mc.jsonl", QUESTIONS)
    out = tmp_path / "mc"
    caictl("eval", "mc", mc, "--model", tiny_model, "-o", out)
    records = read_jsonl(out / "records.jsonl")
    summary = json.loads((out / "summary.json").read_text())["files"][str(mc)]
    assert len(records) == 6 and summary["questions"] == 6
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 6, abs=1e-4)
    engine = load_engine("hf", str(tiny_model))
    logprobs = engine.choice_logprobs([QUESTIONS[0]["prompt"]], [" (A)", " (B)", " (C)"])[0]
    total = sum(math.exp(lp) for lp in logprobs)
    assert records[0]["p_correct"] == pytest.approx(math.exp(logprobs[0]) / total, abs=1e-5)
    assert (out / "reliability.png").exists() and "| mc.jsonl | 6 |" in (out / "report.md").read_text()
    bad = write_jsonl(tmp_path / "bad.jsonl", [QUESTIONS[0], {"prompt": "x", "corrects": []}])
    result = caictl("eval", "mc", bad, "--model", tiny_model, "-o", tmp_path / "bad", check=False)
    assert result.returncode == 2 and "bad.jsonl:2: a multiple-choice row needs" in result.stderr


def test_eval_pm_on_the_shared_comparisons(tmp_path, shared_data):
    pm = tiny.run(tiny.InitModelConfig(out=tmp_path / "pm", preset="tiny", task="seq-cls"))
    hhh = shared_data / "anthropic-evals" / "438HHHEvaluations.part-a.jsonl"
    out = tmp_path / "eval-pm"
    caictl("eval", "pm", hhh, "--pm", pm, "-o", out, "--max-length", "128")
    records = read_jsonl(out / "records.jsonl")
    summary = json.loads((out / "summary.json").read_text())["files"][str(hhh)]
    assert summary["comparisons"] == 120 == len(records)
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 120, abs=1e-4)
    first = json.loads(hhh.read_text().splitlines()[0])
    expected = Scorer(pm, max_length=128).score([first["text_correct"]])[0]
    assert records[0]["reward_chosen"] == pytest.approx(expected, abs=1e-4)
