"""The full pipeline, reduced (tiny models, a few prompts), end to end through examples/full-pipeline.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLES, ROOT, caictl, read_jsonl, write_jsonl

from caictl.data.constitution import load
from caictl.stages.eval_report import revision_statistics


def held_out_sets(tmp_path) -> list[Path]:
    """Three prompts of each held-out set, in a folder of their own: a set is named after its file, and
    helpful.jsonl beside them is the training file, which the pipeline decontaminates against these."""
    (tmp_path / "held-out").mkdir()
    return [write_jsonl(tmp_path / "held-out" / f"{name}.jsonl",
                        read_jsonl(EXAMPLES / "held-out" / f"{name}.jsonl")[:3]) for name in ("harmless", "helpful")]


@pytest.mark.slow
def test_reduced_full_pipeline_ends_with_a_report(tmp_path):
    # Ten red-team prompts that no held-out one is close to: the pipeline drops rt-007 (a paraphrase of ho-h-001).
    red_team = write_jsonl(tmp_path / "red-team.jsonl",
                           [row for row in read_jsonl(EXAMPLES / "red-team.jsonl") if row["id"] != "rt-007"][:10])
    helpful = write_jsonl(tmp_path / "helpful.jsonl", read_jsonl(EXAMPLES / "helpful.jsonl")[:4])
    held_out = held_out_sets(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAICTL_")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", RUN="t", PRESET="tiny", ROUNDS="2",
               TOKENS="8", PPO_STEPS="2", PPO_BATCH="4", RED_TEAM=str(red_team), HELPFUL=str(helpful),
               EVAL_PROMPTS=" ".join(map(str, held_out)))
    result = subprocess.run(["bash", str(ROOT / "examples" / "full-pipeline.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "report: runs/t/report/report.md"
    run = tmp_path / "runs" / "t"
    report = (run / "report" / "report.md").read_text()
    for stage in ("| init-model |", "| sft |", "| train-pm |", "| ppo |"):
        assert stage in report
    assert "### Revisions: `runs/t/revisions.jsonl`" in report and "### Labels: `runs/t/prefs.jsonl`" in report
    summary = json.loads((run / "report" / "summary.json").read_text())
    compare = summary["compare"]["runs/t/eval"]
    assert list(compare["models"]) == ["base", "sl-cai", "rl-cai"] and compare["sets"] == {"harmless": 3, "helpful": 3}
    assert set(compare["ratings"]) == {"pm", "judge"}
    # The helpful held-out set is judged under the helpful constitution because the script maps it, not by its name.
    eval_summary = json.loads((run / "eval" / "summary.json").read_text())
    assert eval_summary["set_constitutions"] == {"harmless": "harmless", "helpful": "helpful"}
    revisions = summary["revisions"]["runs/t/revisions.jsonl"]
    assert revisions["prompts"] == 10 and sum(p["rounds"] for p in revisions["per_principle"].values()) == 20
    assert (run / "report" / "principles.png").stat().st_size > 1000


@pytest.mark.slow
def test_reduced_combined_pipeline_drives_helpfulness_by_its_constitution_too(tmp_path):
    red_team = write_jsonl(tmp_path / "red-team.jsonl", read_jsonl(EXAMPLES / "red-team.jsonl")[:6])
    helpful = write_jsonl(tmp_path / "helpful.jsonl", read_jsonl(EXAMPLES / "helpful.jsonl")[:2])
    instructions = write_jsonl(tmp_path / "instructions.jsonl", read_jsonl(EXAMPLES / "instructions.jsonl")[:10])
    held_out = held_out_sets(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAICTL_")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", RUN="t", PRESET="tiny", ROUNDS="1",
               TOKENS="8", PPO_STEPS="2", PPO_BATCH="4", RED_TEAM=str(red_team), HELPFUL="1",
               HELPFUL_PROMPTS=str(helpful), INSTRUCTIONS=str(instructions), EVAL_PROMPTS=" ".join(map(str, held_out)))
    result = subprocess.run(["bash", str(ROOT / "examples" / "full-pipeline.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    # 10 instruction prompts: 4 trained on (revised and labelled under helpful), the last 6 held out for the eval.
    revisions = read_jsonl(run / "revisions-helpful.jsonl")
    helpful_ids = {p.id for p in load("helpful").critique_revision}
    assert len(revisions) == 4 and all(s["principle"] in helpful_ids for r in revisions for s in r["steps"])
    assert len(read_jsonl(run / "prefs-helpful.jsonl")) == 4
    # One SFT and one PM on both kinds of data.
    sft_inputs = [i["path"] for i in json.loads((run / "models" / "sl-cai" / "caictl.json").read_text())["inputs"]]
    assert {"runs/t/revisions.jsonl", "runs/t/revisions-helpful.jsonl"} <= set(sft_inputs)
    pm_inputs = [i["path"] for i in json.loads((run / "models" / "pm" / "caictl.json").read_text())["inputs"]]
    assert pm_inputs == ["runs/t/prefs.jsonl", "runs/t/prefs-helpful.jsonl"]
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["sets"] == {"harmless": 3, "helpful": 3, "instructions": 6}
    assert summary["set_constitutions"] == {"harmless": "harmless", "helpful": "helpful", "instructions": "helpful"}
    assert set(summary["frontier"]["helpful"]) == {"base", "sl-cai", "rl-cai"}
    assert "constraints_met" in summary["per_model"]["instructions"]["rl-cai"]
    assert (run / "eval" / "frontier.png").stat().st_size > 1000
    assert "frontier.png" in (run / "report" / "report.md").read_text()


def test_revision_statistics_follow_what_revise_built_on():
    records = [{"initial_response": "a b c", "response": "a b d", "flags": ["empty_revision"], "steps": [
        {"principle": "p", "revision": "a b d", "flags": []},
        {"principle": "q", "revision": "", "flags": ["empty_revision"]},  # discarded: the next round sees "a b d"
        {"principle": "p", "revision": "a b d", "flags": []},  # unchanged
    ]}]
    stats = revision_statistics(records)
    assert stats["per_principle"]["p"] == {"rounds": 2, "change_rate": 0.5, "mean_change_size": round(1 / 6, 4),
                                           "discarded_rate": 0.0}
    assert stats["per_principle"]["q"]["discarded_rate"] == 1.0 and stats["per_principle"]["q"]["change_rate"] is None
    assert stats["final_differs_from_initial"] == 1.0 and stats["flags"] == {"empty_revision": 1}


def test_report_on_a_folder_without_artifacts_says_so(tmp_path):
    (tmp_path / "notes.jsonl").write_text('{"id": 1}\n')
    result = caictl("eval", "report", tmp_path, check=False)
    assert result.returncode == 2 and "no caictl artifacts found" in result.stderr
    assert caictl("eval", "report", tmp_path / "missing", check=False).returncode == 2
