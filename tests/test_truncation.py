"""No silent cuts: a prompt longer than the model's context is cut from the front, and the cut is counted in the
row's meta (truncated_tokens), in the stage's summary and in one warning. The same for a judge's questions and for
texts longer than a preference model's --max-length (pm_truncated_tokens)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import caictl, read_jsonl, write_jsonl

from caictl.stages import init_model as tiny

CONTEXT = 256  # positions in the copy of the tiny model used here
LONG = "Tell me everything about " + "the long history of rivers, lakes and seas " * 60 + "please."
PM_MAX_LENGTH = 64  # a short conversation fits it, LONG does not


@pytest.fixture(scope="module")
def short_context_model(tiny_model, tmp_path_factory):
    """The tiny model with a 256-token context (RoPE takes any length; the engine fits prompts to the config)."""
    folder = tmp_path_factory.mktemp("short-context") / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    return folder


@pytest.fixture(scope="module")
def pm(tmp_path_factory):
    return tiny.run(tiny.InitModelConfig(out=tmp_path_factory.mktemp("cut-pm") / "pm", preset="tiny", task="seq-cls"))


def conversation(content: str, response: str) -> list[dict]:
    return [{"role": "user", "content": content}, {"role": "assistant", "content": response}]


@pytest.fixture
def comparisons(tmp_path):
    return write_jsonl(tmp_path / "comparisons.jsonl", [
        {"id": "long", "prompt": LONG, "chosen": "Rivers run to the sea.", "rejected": "No."},
        {"id": "short", "prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}])


def one_warning(stderr: str, text: str) -> str:
    warnings = [line for line in stderr.splitlines() if text in line]
    assert len(warnings) == 1, stderr
    return warnings[0]


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
    from caictl.stages import eval_compare as compare

    compare.run(compare.EvalCompareConfig(prompts=[str(prompts)], out=str(tmp_path / "eval"),
                                                  models=[f"m={short_context_model}"], max_new_tokens=8))
    rows = {row["id"]: row for row in read_jsonl(tmp_path / "eval" / "responses.jsonl")}
    assert rows["m/prompts/long"]["meta"]["truncated_tokens"] > 0
    assert "truncated_tokens" not in rows["m/prompts/short"]["meta"]
    assert capfd.readouterr().err.count("did not fit the model's context") == 1


def test_label_counts_questions_cut_to_fit(short_context_model, tmp_path, capfd):
    from caictl.stages import label

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": "long", "messages": [{"role": "user", "content": LONG}], "responses": ["Rivers.", "No."]},
        {"id": "short", "messages": [{"role": "user", "content": "Hi"}], "responses": ["Hello.", "Go away."]}])
    summary = label.run(label.LabelConfig(pairs=str(pairs), out=str(tmp_path / "prefs.jsonl"),
                                          model=str(short_context_model)))
    rows = {row["id"]: row for row in read_jsonl(tmp_path / "prefs.jsonl")}
    cut = rows["long"]["meta"]["truncated_tokens"]
    assert cut > 0 and "truncated_tokens" not in rows["short"]["meta"]
    assert cut == sum(vote["truncated_tokens"] for vote in rows["long"]["votes"])
    assert summary["truncated_rows"] == 1 and summary["truncated_tokens"] == cut
    assert one_warning(capfd.readouterr().err, "did not fit the model's context").startswith("warning: 1 question")


def test_eval_mc_counts_questions_cut_to_fit(short_context_model, tmp_path, capfd):
    from caictl.stages import eval_mc as eval

    mc = write_jsonl(tmp_path / "mc.jsonl", [{"prompt": LONG + " Answer:", "corrects": [" yes"], "incorrects": [" no"]},
                                             {"prompt": "Hi. Answer:", "corrects": [" yes"], "incorrects": [" no"]}])
    summary = eval.run(eval.EvalMCConfig(files=[str(mc)], out=str(tmp_path / "mc"), model=str(short_context_model)))
    long, short = read_jsonl(tmp_path / "mc" / "records.jsonl")
    assert long["truncated_tokens"] > 0 and "truncated_tokens" not in short
    assert summary["files"][str(mc)]["truncated_questions"] == 1
    one_warning(capfd.readouterr().err, "did not fit the model's context")


def test_score_counts_texts_cut_to_the_pm_max_length(pm, comparisons, tmp_path):
    out = tmp_path / "scored.jsonl"
    result = caictl("score", "--pm", pm, comparisons, "-o", out, "--max-length", PM_MAX_LENGTH)
    rows = {row["id"]: row for row in read_jsonl(out)}
    assert rows["long"]["pm_truncated_tokens"] > 0 and "pm_truncated_tokens" not in rows["short"]
    warning = one_warning(result.stderr, f"longer than the preference model's --max-length {PM_MAX_LENGTH}")
    assert warning.startswith("warning: 1 text(s)"), warning


def test_eval_pm_counts_pairs_cut_to_the_pm_max_length(pm, comparisons, tmp_path, capfd):
    from caictl.stages import eval_pm

    summary = eval_pm.run(eval_pm.EvalPMConfig(files=[str(comparisons)], out=str(tmp_path / "pm"), pm=str(pm),
                                            max_length=PM_MAX_LENGTH))
    long, short = read_jsonl(tmp_path / "pm" / "records.jsonl")
    assert long["pm_truncated_tokens"] > 0 and "pm_truncated_tokens" not in short
    assert summary["files"][str(comparisons)]["truncated_pairs"] == 1
    one_warning(capfd.readouterr().err, "longer than the preference model's")


def test_train_pm_counts_comparisons_cut_to_max_length(pm, comparisons, tmp_path, capfd):
    from caictl.stages import train_pm

    metrics = train_pm.run(train_pm.TrainPMConfig(prefs=[str(comparisons)], out=str(tmp_path / "trained"),
                                                  model=str(pm), max_length=PM_MAX_LENGTH, epochs=1))
    assert metrics["truncated_examples"] == 1
    assert one_warning(capfd.readouterr().err, f"--max-length {PM_MAX_LENGTH}").startswith("warning: 1 of 2")


def test_eval_compare_counts_judge_and_pm_cuts(short_context_model, pm, prompts, tmp_path, capfd):
    from caictl.stages import eval_compare as compare

    compare.run(compare.EvalCompareConfig(
        prompts=[str(prompts)], out=str(tmp_path / "eval"), models=[f"m={short_context_model}", "n=" + str(
            short_context_model)], judge=str(short_context_model), judge_refusal=True, pm=str(pm), max_new_tokens=8))
    judged = {row["prompt_id"]: row for row in read_jsonl(tmp_path / "eval" / "judgements.jsonl")}
    assert judged["long"]["meta"]["truncated_tokens"] > 0 and "truncated_tokens" not in judged["short"]["meta"]
    records = {(r["model"], r["prompt_id"]): r for r in read_jsonl(tmp_path / "eval" / "records.jsonl")}
    assert records[("m", "long")]["judge_refusal_truncated_tokens"] > 0
    assert "judge_refusal_truncated_tokens" not in records[("m", "short")]
    # LONG is longer than the PM's 512 tokens too.
    assert records[("m", "long")]["pm_truncated_tokens"] > 0 and "pm_truncated_tokens" not in records[("m", "short")]
    err = capfd.readouterr().err
    one_warning(err, "longer than the preference model's")
    one_warning(err, "judge question(s) did not fit")
    one_warning(err, "refusal question(s) did not fit")
