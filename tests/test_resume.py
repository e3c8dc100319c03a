"""A kill loses at most one batch: every generating stage writes each batch as it completes, and a re-run ends with
what an uninterrupted run writes, row for row (the kill -9 itself: tests/test_revise.py). A resume checks the
model itself, not how its path is spelled."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import EXAMPLES, caictl, caictl_in_process, read_jsonl, write_jsonl

from caictl.stages import init_model as tiny

BATCH = 2


@pytest.fixture(scope="module")
def pm(tiny_pm):
    return tiny_pm


def lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def on_disk_at_each_call(monkeypatch, owner, name: str, path) -> list[int]:
    """Wraps the real owner.name so that each call first notes how many rows `path` holds."""
    seen, real = [], getattr(owner, name)

    def noting(*args, **kwargs):
        seen.append(lines(path))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, noting)
    return seen


@pytest.mark.parametrize("stage", ["revise", "sample", "label", "score", "eval compare answers",
                                   "eval compare judgements"])
def test_each_batch_is_on_disk_before_the_next_one_starts(stage, tmp_path, tiny_model, pm, monkeypatch):
    from caictl.feedback import judge
    from caictl.models import pm as pm_module
    from caictl.stages import eval_compare as compare
    from caictl.stages import label, revise, sample, score

    prompts = str(write_jsonl(tmp_path / "prompts.jsonl", read_jsonl(EXAMPLES / "red-team.jsonl")[:3 * BATCH]))
    pairs = str(write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": f"p{i}", "messages": [{"role": "user", "content": f"Question {i}?"}],
         "responses": [f"Answer {i}.", "No."]} for i in range(3 * BATCH)]))
    out, model = tmp_path / "out.jsonl", str(tiny_model)
    fast = dict(max_new_tokens=4, batch_size=BATCH)
    compare_run = dict(prompts=[prompts], out=str(tmp_path / "eval"), models=[f"m={model}"], **fast)
    seen = {
        "revise": lambda: on_disk_at_each_call(monkeypatch, revise.Reviser, "revise", out),
        "sample": lambda: on_disk_at_each_call(monkeypatch, sample, "respond", out),
        "label": lambda: on_disk_at_each_call(monkeypatch, judge.Judge, "votes", out),
        "score": lambda: on_disk_at_each_call(monkeypatch, pm_module.Scorer, "score", out),
        "eval compare answers": lambda: on_disk_at_each_call(monkeypatch, compare, "respond",
                                                             tmp_path / "eval" / "responses.jsonl"),
        "eval compare judgements": lambda: on_disk_at_each_call(monkeypatch, judge.Judge, "votes",
                                                                tmp_path / "eval" / "judgements.jsonl"),
    }[stage]()
    {
        "revise": lambda: revise.run(revise.ReviseConfig(prompts=prompts, out=str(out), model=model, rounds=1,
                                                         few_shot=False, **fast)),
        "sample": lambda: sample.run(sample.SampleConfig(prompts=prompts, out=str(out), model=model, n=2, **fast)),
        "label": lambda: label.run(label.LabelConfig(pairs=pairs, out=str(out), model=model, batch_size=BATCH)),
        "score": lambda: score.run(score.ScoreConfig(pm=str(pm), file=pairs, out=str(out), batch_size=BATCH)),
        "eval compare answers": lambda: compare.run(compare.EvalCompareConfig(**compare_run)),
        "eval compare judgements": lambda: compare.run(compare.EvalCompareConfig(
            **{**compare_run, "models": [f"m={model}", f"n={model}"]}, judge=model)),
    }[stage]()
    assert seen == [0, BATCH, 2 * BATCH]


def test_a_killed_score_run_resumes_to_what_an_uninterrupted_run_writes(tmp_path, pm):
    rows = write_jsonl(tmp_path / "rows.jsonl", [
        {"id": f"s{i}", "messages": [{"role": "user", "content": f"Question {i}?"}], "response": f"Answer {i}."}
        for i in range(5)])
    straight, killed = tmp_path / "straight.jsonl", tmp_path / "killed.jsonl"
    caictl_in_process("score", rows, "--pm", pm, "-o", straight, "--batch-size", BATCH)
    # What a kill leaves: the batches written so far, and maybe half a line.
    written = straight.read_text().splitlines(keepends=True)
    killed.write_text("".join(written[:BATCH]) + written[BATCH][:20])
    resumed = caictl("score", rows, "--pm", pm, "-o", killed, "--batch-size", BATCH)
    assert f"{BATCH} of 5 rows already scored" in resumed.stderr
    assert read_jsonl(killed) == read_jsonl(straight)
    other_input = write_jsonl(tmp_path / "other.jsonl", [{**row, "response": "Other."} for row in read_jsonl(rows)])
    refused = caictl("score", other_input, "--pm", pm, "-o", killed, check=False)
    assert refused.returncode == 2 and "killed.jsonl:1: was not scored from this input row" in refused.stderr


def test_the_same_model_resumes_however_its_path_is_spelled_and_a_rebuilt_one_does_not(tmp_path, tiny_model):
    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model, model)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", read_jsonl(EXAMPLES / "red-team.jsonl")[:3])
    out = tmp_path / "pairs.jsonl"
    run = ["sample", prompts, "-o", out, "-n", "1", "--max-new-tokens", "4"]
    caictl(*run, "--model", model, "--limit", "1")
    resumed = caictl(*run, "--model", f"{model}/", "--limit", "2")  # another spelling, relative to another folder
    assert "1 of 2 prompts already done" in resumed.stderr
    resumed = caictl(*run, "--model", os.path.relpath(model, tmp_path), "--limit", "3", cwd=tmp_path)
    assert "2 of 3 prompts already done" in resumed.stderr and len(read_jsonl(out)) == 3

    shutil.rmtree(model)
    tiny.run(tiny.InitModelConfig(out=model, preset="tiny", seed=7))  # other weights, same path
    refused = caictl(*run, "--model", model, check=False)
    assert refused.returncode == 2 and "model_identity: 'sha256:" in refused.stderr and "--overwrite" in refused.stderr


def test_a_served_model_is_known_by_its_name_not_the_server_address():
    from caictl.models.identity import identity

    assert identity("qwen", "openai") == "served:qwen" == identity("qwen", "openai")
    assert identity("qwen", "openai") != identity("llama", "openai")


def test_a_folder_digest_is_read_again_only_when_a_file_changes_size_or_time(tmp_path, tiny_model, monkeypatch):
    from caictl.models.identity import folder_digest

    monkeypatch.setenv("CAICTL_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    first = folder_digest(model)
    weights = next(model.glob("*.safetensors"))
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other content...
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...and the same time: the cached digest stands
    assert folder_digest(model) == first
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: read again
    assert folder_digest(model) != first


def test_text_sampled_by_another_sampler_is_not_resumed(tmp_path, tiny_model):
    """The same seed gives other text under another sampler, so the sampler is a resume setting."""
    from caictl.errors import UsageError
    from caictl.stages import sample

    prompts = write_jsonl(tmp_path / "prompts.jsonl", read_jsonl(EXAMPLES / "red-team.jsonl")[:2])
    out = tmp_path / "pairs.jsonl"
    config = sample.SampleConfig(prompts=str(prompts), out=str(out), model=str(tiny_model), n=1, max_new_tokens=4,
                                 limit=1)
    sample.run(config)
    assert read_jsonl(out)[0]["meta"]["sampling"]["sampler"] == "gumbel-hash32"
    out.write_text(out.read_text().replace('"sampler": "gumbel-hash32"', '"sampler": "torch-generator"'))
    with pytest.raises(UsageError, match="sampler"):
        sample.run(sample.SampleConfig(**{**config.__dict__, "limit": 2}))
