"""Iterated RL-CAI, reduced (tiny models, a few prompts), end to end through examples/iterated-pipeline.sh: finished
rounds are skipped, an unfinished one resumes, and the report has a row per round."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, ROOT, read_jsonl, write_jsonl


def iterated(tmp_path, iterations: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAICTL_")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", RUN="t", PRESET="tiny", ROUNDS="1",
               TOKENS="8", PPO_STEPS="1", PPO_BATCH="4", ITERATIONS=str(iterations),
               RED_TEAM=str(tmp_path / "red-team.jsonl"), HELPFUL=str(tmp_path / "helpful.jsonl"),
               EVAL_PROMPT=str(tmp_path / "held-out.jsonl"))
    result = subprocess.run(["bash", str(ROOT / "examples" / "iterated-pipeline.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_rounds_and_a_resumed_second(tmp_path):
    write_jsonl(tmp_path / "red-team.jsonl", read_jsonl(EXAMPLES / "red-team.jsonl")[:8])
    write_jsonl(tmp_path / "helpful.jsonl", read_jsonl(EXAMPLES / "helpful.jsonl")[:2])
    write_jsonl(tmp_path / "held-out.jsonl", read_jsonl(EXAMPLES / "held-out" / "harmless.jsonl")[:4])
    run = tmp_path / "runs" / "t"
    iterated(tmp_path, 2)
    for k in (1, 2):
        assert (run / f"iter-{k}" / "done").exists() and (run / f"iter-{k}" / "policy" / "caictl.json").exists()
    # Round 2 continued from round 1: its PPO started from round 1's policy, its PM trained on both rounds' labels.
    ppo = json.loads((run / "iter-2" / "policy" / "caictl.json").read_text())
    assert ppo["policy"] == "runs/t/iter-1/policy"
    pm = json.loads((run / "iter-2" / "pm" / "caictl.json").read_text())
    assert pm["options"]["prefs"] == ["runs/t/iter-1/prefs.jsonl", "runs/t/iter-2/prefs.jsonl"]
    assert pm["backbone"].endswith("runs/t/iter-1/pm")

    # Round 2 killed during its PPO: a re-run skips round 1 and resumes round 2 from its labels and PM.
    finished = {path: path.stat().st_mtime_ns for path in run.glob("iter-1/**/*") if path.is_file()}
    kept = {path: path.stat().st_mtime_ns for path in
            (run / "iter-2" / "prefs.jsonl", run / "iter-2" / "pm" / "caictl.json")}
    (run / "iter-2" / "done").unlink()
    shutil.rmtree(run / "iter-2" / "policy")
    result = iterated(tmp_path, 2)
    assert "iteration 1 of" not in result.stderr and "iteration 2 of 2" in result.stderr
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    assert {path: path.stat().st_mtime_ns for path in kept} == kept  # nothing labelled or trained again
    assert (run / "iter-2" / "done").exists() and (run / "iter-2" / "policy" / "caictl.json").exists()

    summary = json.loads((run / "iterations" / "summary.json").read_text())
    rows = summary["rounds"]
    assert [r["round"] for r in rows] == [1, 2] and rows[0]["previous_pm_disagreement"] is None
    for row in rows:
        assert 0 <= row["pm_heldout_accuracy"] <= 1 and row["reward_after"] is not None
        assert row["kl_from_reference"] is not None and 0 <= row["refusal_rate"] <= 1
    assert all(0 <= r["previous_pm_disagreement"] <= 1 for r in rows[1:])
    assert "| 2 |" in (run / "iterations" / "report.md").read_text()


def test_kl_from_the_reference_is_zero_for_itself_and_positive_for_another_model(tmp_path, tiny_model):
    from caictl.data.reading import read_prompts
    from caictl.stages import init_model as tiny
    from caictl.stages.eval_iterations import EvalIterationsConfig, load_model, sample_with_kl

    prompts = read_prompts(EXAMPLES / "held-out" / "harmless.jsonl")[:6]
    config = EvalIterationsConfig(run="", prompts="", reference="", out="", max_new_tokens=12, batch_size=4)
    responses, itself = sample_with_kl(tiny_model, load_model(tiny_model), prompts, config)
    assert itself == 0.0 and len(responses) == 6
    other = tiny.run(tiny.InitModelConfig(out=tmp_path / "other", preset="tiny", seed=5))
    assert sample_with_kl(tiny_model, load_model(other), prompts, config)[1] > 0.01
    # With one new token the estimate is the KL of the first step's distributions, whatever was sampled.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from caictl.data.control_text import ContentEncoder

    one_token = EvalIterationsConfig(run="", prompts="", reference="", out="", max_new_tokens=1)
    ids = ContentEncoder(AutoTokenizer.from_pretrained(tiny_model)).encode_chats([prompts[0].messages],
                                                                                 add_generation_prompt=True)
    with torch.no_grad():
        p, q = (torch.log_softmax(AutoModelForCausalLM.from_pretrained(m)(torch.tensor(ids)).logits[0, -1].float(), -1)
                for m in (tiny_model, other))
    direct = float((p.exp() * (p - q)).sum())
    assert sample_with_kl(tiny_model, load_model(other), prompts[:1], one_token)[1] == pytest.approx(direct, abs=1e-6)
    assert abs(direct - float((q.exp() * (q - p)).sum())) > 1e-6  # the other direction is another number
