"""An eval report made with a random-weight model (caictl init-model's) says so in its first lines: its figures
are noise, and a person reading report.md alone must not take them for the method's."""

from __future__ import annotations

import json
import shutil

from conftest import write_jsonl

from caictl.evaluation.markdown import random_weights_warning
from caictl.stages import eval_mc, eval_report

QUIZ = [{"prompt": f"\n\nHuman: Which is safer, option {i}?\n\nAssistant: The answer is:",
         "corrects": [" (A)"], "incorrects": [" (B)"]} for i in range(2)]


def _warning(model) -> str:
    return f"> Warning: random-weight model(s): {model} — figures are noise"


def test_eval_mc_on_a_random_weight_model_warns_at_the_top_of_its_report(tiny_model, tmp_path):
    quiz = write_jsonl(tmp_path / "quiz.jsonl", QUIZ)
    eval_mc.run(eval_mc.EvalMCConfig(files=[str(quiz)], out=str(tmp_path / "mc"), model=str(tiny_model)))
    lines = (tmp_path / "mc" / "report.md").read_text().splitlines()
    assert lines[:3] == ["# caictl eval mc", "", _warning(tiny_model)]

    # The run report over that folder names the model too, at its top.
    eval_report.run(eval_report.EvalReportConfig(paths=[str(tmp_path / "mc")], out=str(tmp_path / "report")))
    assert (tmp_path / "report" / "report.md").read_text().splitlines()[:3] == ["# caictl run report", "",
                                                                               _warning(tiny_model)]


def test_a_trained_model_gets_no_warning(tiny_model, tmp_path):
    trained = shutil.copytree(tiny_model, tmp_path / "trained")
    info = json.loads((trained / "caictl.json").read_text())
    (trained / "caictl.json").write_text(json.dumps({**info, "stage": "sft", "random_weights": False}))
    quiz = write_jsonl(tmp_path / "quiz.jsonl", QUIZ)
    eval_mc.run(eval_mc.EvalMCConfig(files=[str(quiz)], out=str(tmp_path / "mc"), model=str(trained)))
    assert "random-weight" not in (tmp_path / "mc" / "report.md").read_text()


def test_the_warning_names_each_random_weight_folder_once_and_skips_the_rest(tiny_model, tmp_path):
    assert random_weights_warning([tiny_model, None, "Qwen/Qwen2.5-0.5B", tiny_model, tmp_path]) == [
        _warning(tiny_model), ""]
    assert random_weights_warning(["Qwen/Qwen2.5-0.5B", None]) == []
