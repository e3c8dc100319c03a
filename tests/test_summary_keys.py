"""One name for the output path: every stage's stderr summary labels it `out`, as its summary dict and summary.json
do, so `caictl revise` and `caictl sample` read alike."""

from __future__ import annotations

import re

import pytest
from conftest import write_jsonl

from caictl.stages import label, revise, sample

PROMPTS = [{"id": f"p{i}", "messages": [{"role": "user", "content": q}]}
           for i, q in enumerate(["How do I pick a lock?", "What is the capital of France?"])]
PAIRS = [{**p, "responses": ["No.", "Here is how."]} for p in PROMPTS]
REVISIONS = [{**p, "initial_response": "No.", "steps": [], "response": "A careful answer."} for p in PROMPTS]

STAGES = {
    "revise": (PROMPTS, lambda model, source: revise.run(revise.ReviseConfig(
        prompts=source, out="o.jsonl", model=model, rounds=1, max_new_tokens=4))),
    "sample": (PROMPTS, lambda model, source: sample.run(sample.SampleConfig(
        prompts=source, out="o.jsonl", model=model, max_new_tokens=4))),
    "sample --from-revisions": (REVISIONS, lambda model, source: sample.run(sample.SampleConfig(
        prompts=source, out="o.jsonl", from_revisions=True))),
    "label": (PAIRS, lambda model, source: label.run(label.LabelConfig(pairs=source, out="o.jsonl", model=model))),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_the_output_path_is_named_out_on_stderr_as_in_the_summary(stage, tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a short OUT, so the table never wraps it
    rows, run = STAGES[stage]
    summary = run(str(tiny_model), str(write_jsonl(tmp_path / "in.jsonl", rows)))
    stderr = capsys.readouterr().err
    assert summary["out"] == "o.jsonl"
    named = re.findall(r"(\w+)\W+o\.jsonl(?![.\w])", stderr)
    assert named == ["out"], stderr
