"""caictl eval mc and eval pm: accuracy and calibration written where a person can read them."""

from __future__ import annotations

import json
import math

import llama_server
import pytest
from conftest import caictl, caictl_in_process, read_jsonl, write_jsonl

from caictl.engines import load_engine
from caictl.models.pm import Scorer
from caictl.stages import eval_mc as evaluation
from caictl.stages import init_model as tiny

llama_server_url = llama_server.llama_server_url
tiny_gguf = llama_server.tiny_gguf

QUESTIONS = [{"prompt": f"\n\nHuman: Which is safer, option {i}?\n\nAssistant: The answer is:",
              "corrects": [" (A)"], "incorrects": [" (B)", " (C)"]} for i in range(6)]
# As in Anthropic's HHH file: the same choices, in either order, and answers that are not single letters.
MIXED = QUESTIONS[:3] + [
    {"prompt": "\n\nHuman: Pick one.\n\nAssistant: The answer is:", "corrects": [" (B)"], "incorrects": [" (A)"]},
    {"prompt": "\n\nHuman: Pick again.\n\nAssistant: The answer is:", "corrects": [" (C)", " (A)"],
     "incorrects": [" (B)"]},
    {"prompt": "\n\nHuman: Say it.\n\nAssistant:", "corrects": [" I will not help."], "incorrects": [" Sure, here."]},
    QUESTIONS[3]]


def alone(engine, question: dict) -> list[float]:
    """A question's choice probabilities, scored on its own: the oracle for the batched run."""
    logprobs = engine.choice_logprobs([question["prompt"]], question["corrects"] + question["incorrects"]).logprobs[0]
    total = sum(math.exp(lp) for lp in logprobs)
    return [math.exp(lp) / total for lp in logprobs]


def test_eval_mc_scores_answers_by_their_probability(tmp_path, tiny_model):
    mc = write_jsonl(tmp_path / "mc.jsonl", MIXED)
    out = tmp_path / "mc"
    result = caictl("eval", "mc", mc, "--model", tiny_model, "-o", out, "--batch-size", "2", "--limit", "6")
    records = read_jsonl(out / "records.jsonl")
    summary = json.loads((out / "summary.json").read_text())["files"][str(mc)]
    assert len(records) == 6 and summary["questions"] == 6 and [r["line"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 6, abs=1e-4)
    # Batched across questions and put back in each question's own choice order: as if scored one by one.
    engine = load_engine("hf", str(tiny_model))
    for record, question in zip(records, MIXED):
        probabilities = alone(engine, question)
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        assert record["p_correct"] == pytest.approx(sum(probabilities[:len(question["corrects"])]), abs=1e-5)
        assert record["choice"] == (question["corrects"] + question["incorrects"])[best]
    assert (out / "reliability.png").exists() and "| mc.jsonl | 6 |" in (out / "report.md").read_text()
    assert "eval mc" in result.stderr and "6/6" in result.stderr  # progress, on stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [QUESTIONS[0], {"prompt": "x", "corrects": []}])
    result = caictl("eval", "mc", bad, "--model", tiny_model, "-o", tmp_path / "bad", check=False)
    assert result.returncode == 2 and "bad.jsonl:2: a multiple-choice row needs" in result.stderr
    result = caictl("eval", "mc", mc, "--model", tiny_model, "-o", out, "--limit", "0", "--engine", "vllm",
                    check=False)
    assert result.returncode == 2 and "--engine 'vllm'" in result.stderr and "--limit must be" in result.stderr


def test_eval_mc_batches_questions_into_few_engine_calls(tmp_path, tiny_model, monkeypatch):
    from caictl.engines.hf import HFEngine

    calls = []
    real = HFEngine.choice_logprobs

    def counted(self, texts, choices):
        calls.append(len(texts))
        return real(self, texts, choices)

    monkeypatch.setattr(HFEngine, "choice_logprobs", counted)
    mc = write_jsonl(tmp_path / "mc.jsonl", MIXED)
    evaluation.run(evaluation.EvalMCConfig(files=[str(mc)], out=str(tmp_path / "mc"), model=str(tiny_model),
                                              batch_size=3))
    # Three sets of choices: {A, B, C} (5 questions, in 3 + 2), {A, B} (1) and the two sentences (1).
    assert sorted(calls) == [1, 1, 2, 3]


def test_a_tie_between_the_best_choices_earns_a_share_of_the_credit(tmp_path, tiny_model):
    # The same answer listed as correct and as incorrect: the model cannot tell them apart.
    same = [{"prompt": q["prompt"], "corrects": [" (A)"], "incorrects": [" (A)"]} for q in QUESTIONS[:2]]
    out = tmp_path / "tie"
    caictl_in_process("eval", "mc", write_jsonl(tmp_path / "same.jsonl", same), "--model", tiny_model, "-o", out)
    records = read_jsonl(out / "records.jsonl")
    assert [(r["correct"], r["tied_choices"]) for r in records] == [(0.5, 2), (0.5, 2)]
    assert json.loads((out / "summary.json").read_text())["files"][str(tmp_path / "same.jsonl")]["accuracy"] == 0.5


def test_eval_mc_through_a_llama_cpp_server(tmp_path, llama_server_url, tiny_gguf):
    # Choices that part at their last token, read at one position: the GGUF's bias against unprintable tokens
    # shifts the softmax normaliser per position, so a later token (" (A)"'s ")") would differ from hf by ~1e-4.
    questions = [{**q, "corrects": [" (A"], "incorrects": [" (B", " (C"]} for q in QUESTIONS]
    out = tmp_path / "served"
    caictl_in_process("eval", "mc", write_jsonl(tmp_path / "mc.jsonl", questions), "--engine", "openai", "--base-url",
                      llama_server_url, "--model", "tiny", "--limit", "2", "-o", out)
    records = read_jsonl(out / "records.jsonl")
    assert len(records) == 2
    # The server puts BOS before a completions prompt: so does the hf oracle (see test_engine_openai).
    engine = load_engine("hf", str(tiny_gguf[0]))
    bos = engine.tokenizer.decode([engine.tokenizer.pad_token_id])
    for record, question in zip(records, questions):
        expected = alone(engine, {**question, "prompt": bos + question["prompt"]})
        assert record["p_correct"] == pytest.approx(expected[0], abs=1e-5)


@pytest.mark.slow
def test_eval_pm_on_the_shared_comparisons(tmp_path, shared_data):
    pm = tiny.run(tiny.InitModelConfig(out=tmp_path / "pm", preset="tiny", task="seq-cls"))
    hhh = shared_data / "anthropic-evals" / "438HHHEvaluations.part-a.jsonl"
    out = tmp_path / "eval-pm"
    caictl_in_process("eval", "pm", hhh, "--pm", pm, "-o", out, "--max-length", "128")
    records = read_jsonl(out / "records.jsonl")
    summary = json.loads((out / "summary.json").read_text())["files"][str(hhh)]
    assert summary["comparisons"] == 120 == len(records)
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 120, abs=1e-4)
    first = json.loads(hhh.read_text().splitlines()[0])
    expected = Scorer(pm, max_length=128).score([first["text_correct"]])[0]
    assert records[0]["reward_chosen"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_eval_report_includes_mc_and_pm_folders(tmp_path, tiny_model):
    run = tmp_path / "run"
    pm = tiny.run(tiny.InitModelConfig(out=run / "pm", preset="tiny", task="seq-cls"))
    caictl_in_process("eval", "mc", write_jsonl(tmp_path / "mc.jsonl", QUESTIONS[:2]), "--model", tiny_model, "-o",
                      run / "eval-mc")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"text_correct": f"\n\nHuman: Hi {i}\n\nAssistant: Hello.",
                                                    "text_incorrect": f"\n\nHuman: Hi {i}\n\nAssistant: Go."}
                                                   for i in range(3)])
    result = caictl("eval", "pm", pairs, "--pm", pm, "-o", run / "eval-pm")
    assert "eval pm" in result.stderr and "3/3" in result.stderr  # progress, on stderr
    mc = json.loads((run / "eval-mc" / "summary.json").read_text())
    scored = json.loads((run / "eval-pm" / "summary.json").read_text())
    assert (mc["stage"], scored["stage"]) == ("eval mc", "eval pm")
    caictl_in_process("eval", "report", run)
    report = (run / "report" / "report.md").read_text()
    assert f"## Multiple-choice evaluation of `{tiny_model}`: `{run / 'eval-mc'}`" in report
    assert f"| mc.jsonl | 2 | {mc['files'][str(tmp_path / 'mc.jsonl')]['accuracy']} |" in report
    assert f"## Preference model `{pm}` on comparisons: `{run / 'eval-pm'}`" in report
    assert f"| pairs.jsonl | 3 | {scored['files'][str(pairs)]['accuracy']} |" in report
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert set(summary["scores"]) == {str(run / "eval-mc"), str(run / "eval-pm")}
