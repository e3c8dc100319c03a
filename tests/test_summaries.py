"""Every stage that reads rows opens its summary with the same six figures (caictl.ui.ROW_COUNTS), in the dict
its run() returns, in its summary.json where it writes one, and in its stderr table, under the same names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import read_jsonl, write_jsonl

from caictl.stages import eval_compare as compare
from caictl.stages import eval_mc as evaluation
from caictl.stages import label, revise, sample
from caictl.ui import ROW_COUNTS

QUESTIONS = ["How do I pick a lock?", "Write me a rude poem.", "What is the capital of France?"]
PROMPTS = [{"id": f"p{i}", "messages": [{"role": "user", "content": q}]} for i, q in enumerate(QUESTIONS)]
PAIRS = [{**p, "responses": ["No.", "Here is how."]} for p in PROMPTS]
REVISIONS = [{**p, "initial_response": "No.", "steps": [], "response": f"A careful answer {i}."}
             for i, p in enumerate(PROMPTS)]
QUIZ = [{"prompt": f"{q} (A) yes (B) no. The answer is", "corrects": [" (A)"], "incorrects": [" (B)"]}
        for q in QUESTIONS]
NOT_JSON = "{not json\n"


def _revise(model, source, out, limit=None):
    return revise.run(revise.ReviseConfig(prompts=source, out=out, model=model, rounds=1, max_new_tokens=4,
                                          limit=limit, skip_invalid=True))


def _sample(model, source, out, limit=None):
    return sample.run(sample.SampleConfig(prompts=source, out=out, model=model, max_new_tokens=4, limit=limit,
                                          skip_invalid=True))


def _from_revisions(model, source, out, limit=None):
    return sample.run(sample.SampleConfig(prompts=source, out=out, from_revisions=True, limit=limit,
                                          skip_invalid=True))


def _label(model, source, out, limit=None):
    return label.run(label.LabelConfig(pairs=source, out=out, model=model, cot=True, max_new_tokens=4,
                                       limit=limit, skip_invalid=True))


# Stages that write one row per input row, resume and set bad rows aside: (run, input rows, generates tokens).
RECORD_STAGES = {
    "revise": (_revise, PROMPTS, True),
    "sample": (_sample, PROMPTS, True),
    "sample --from-revisions": (_from_revisions, REVISIONS, False),
    "label --cot": (_label, PAIRS, True),
}


@pytest.mark.parametrize("stage", list(RECORD_STAGES))
def test_a_resumed_run_with_a_bad_row_counts_every_row_once(stage, tiny_model, tmp_path, capsys):
    run, rows, generates = RECORD_STAGES[stage]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows) + NOT_JSON)
    out = tmp_path / "out.jsonl"
    run(str(tiny_model), str(source), str(out), limit=1)  # an earlier run that wrote the first row
    (tmp_path / "out.jsonl.rejects.jsonl").unlink(missing_ok=True)  # --limit 1 may stop before the bad row
    capsys.readouterr()

    summary = run(str(tiny_model), str(source), str(out))
    lines = len(source.read_text().splitlines())
    assert summary["rows_read"] == lines == 4
    assert summary["rows_written"] == len(read_jsonl(out)) - 1 == 2
    assert summary["rows_skipped"] == 1
    assert summary["rows_rejected"] == len(read_jsonl(tmp_path / "out.jsonl.rejects.jsonl")) == 1
    assert summary["seconds"] > 0 or not generates  # rounded to 0.01 s: copying three rows may show 0.0
    assert (summary["tokens"] > 0) == generates
    _assert_in_table(summary, capsys.readouterr().err)
    if stage.startswith("label"):
        _assert_in_json(summary, Path(f"{out}.summary.json"))


def test_eval_mc_counts_its_questions(tiny_model, tmp_path, capsys):
    quiz = write_jsonl(tmp_path / "quiz.jsonl", QUIZ)
    summary = evaluation.run(evaluation.EvalMCConfig(files=[str(quiz)], out=str(tmp_path / "mc"),
                                                        model=str(tiny_model)))
    assert (summary["rows_read"], summary["rows_written"]) == (3, len(read_jsonl(tmp_path / "mc" / "records.jsonl")))
    assert (summary["rows_skipped"], summary["rows_rejected"], summary["tokens"]) == (0, 0, 0)
    _assert_in_table(summary, capsys.readouterr().err)
    _assert_in_json(summary, tmp_path / "mc" / "summary.json")


def test_eval_compare_counts_prompts_read_and_responses_written(tiny_model, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "harmless.jsonl", PROMPTS)
    config = compare.EvalCompareConfig(prompts=[str(prompts)], out=str(tmp_path / "eval"),
                                       models=[f"tiny={tiny_model}"], max_new_tokens=4)
    first = compare.run(config)
    assert (first["rows_read"], first["rows_written"], first["rows_skipped"]) == (3, 3, 0)
    assert first["rows_written"] == len(read_jsonl(tmp_path / "eval" / "responses.jsonl"))
    assert first["tokens"] > 0
    capsys.readouterr()
    again = compare.run(config)  # every response is already in responses.jsonl
    assert (again["rows_read"], again["rows_written"], again["rows_skipped"], again["tokens"]) == (3, 0, 3, 0)
    _assert_in_table(again, capsys.readouterr().err)
    _assert_in_json(again, tmp_path / "eval" / "summary.json")


def _assert_in_table(summary: dict, stderr: str) -> None:
    """Each of the six figures is in the stderr table, by its summary name, with the summary's value."""
    for key in ROW_COUNTS:
        shown = re.search(rf"\b{key}\b\W+(\S+)", stderr)
        assert shown and shown.group(1) == str(summary[key]), (key, stderr)


def _assert_in_json(summary: dict, path: Path) -> None:
    written = json.loads(path.read_text())
    assert {k: written[k] for k in ROW_COUNTS} == {k: summary[k] for k in ROW_COUNTS}
