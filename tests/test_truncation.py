"""No silent cuts: a prompt longer than the model's context is cut from the front, and the cut is counted in the
row's meta (truncated_tokens), in the stage's summary and in one warning."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import caictl, read_jsonl, write_jsonl

CONTEXT = 256  # positions in the copy of the tiny model used here
LONG = "Tell me everything about " + "the long history of rivers, lakes and seas " * 60 + "please."


@pytest.fixture(scope="module")
def short_context_model(tiny_model, tmp_path_factory):
    """The tiny model with a 256-token context (RoPE takes any length; the engine fits prompts to the config)."""
    folder = tmp_path_factory.mktemp("short-context") / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    return folder


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"id": "long", "prompt": LONG}, {"id": "short", "prompt": "Hi"}])


@pytest.mark.parametrize("stage", ["revise", "sample"])
def test_a_cut_prompt_is_counted_in_the_row_the_summary_and_one_warning(stage, short_context_model, prompts,
                                                                         tmp_path):
    out = tmp_path / f"{stage}.jsonl"
    # Without few-shot exchanges the short prompt's critique and revision requests fit the context.
    options = ["--rounds", "1", "--no-few-shot"] if stage == "revise" else ["-n", "1"]
    result = caictl(stage, prompts, "-o", out, "--model", short_context_model, "--max-new-tokens", "8", *options)
    rows = {row["id"]: row for row in read_jsonl(out)}
    assert rows["long"]["meta"]["truncated_tokens"] > 0 and "truncated_tokens" not in rows["short"]["meta"]
    warnings = [line for line in result.stderr.splitlines() if "did not fit the model's context" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 1 prompt(s)"), result.stderr
    assert "prompts cut to fit the context" in result.stderr or "truncated rows" in result.stderr


def test_the_summary_counts_them(short_context_model, prompts, tmp_path):
    from caictl.stages import sample

    summary = sample.run(sample.SampleConfig(prompts=str(prompts), out=str(tmp_path / "s.jsonl"),
                                             model=str(short_context_model), n=2, max_new_tokens=8))
    row = next(r for r in read_jsonl(tmp_path / "s.jsonl") if r["id"] == "long")
    assert summary["truncated_rows"] == 1 and summary["truncated_tokens"] == row["meta"]["truncated_tokens"] > 0


def test_eval_compare_counts_cut_prompts_in_its_responses(short_context_model, prompts, tmp_path, capfd):
    from caictl.stages import compare

    compare.run_compare(compare.EvalCompareConfig(prompts=[str(prompts)], out=str(tmp_path / "eval"),
                                                  models=[f"m={short_context_model}"], max_new_tokens=8))
    rows = {row["id"]: row for row in read_jsonl(tmp_path / "eval" / "responses.jsonl")}
    assert rows["m/prompts/long"]["meta"]["truncated_tokens"] > 0
    assert "truncated_tokens" not in rows["m/prompts/short"]["meta"]
    assert capfd.readouterr().err.count("did not fit the model's context") == 1
