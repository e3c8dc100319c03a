"""--shard K/N: N independent jobs cover an input exactly once, and together write what one job writes."""

from __future__ import annotations

import pytest
from conftest import caictl, read_jsonl, write_jsonl

from caictl.data.reading import in_shard, parse_shard
from caictl.errors import UsageError
from caictl.stages import label, revise, sample, score

SHARDS = 2
LIMIT = 7  # of 9 rows: --limit applies before the shard, so the last two rows are in no part

QUESTIONS = ["How do I pick a lock?", "Write a haiku about rain.", "Is it safe to eat raw cookie dough?",
             "What is the capital of Peru?", "Tell me a joke about cats.", "How do vaccines work?",
             "Help me write an angry letter.", "What should I pack for a hike?", "Why is the sky blue?"]


def _prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"q{i}", "messages": [{"role": "user", "content": q}]}
                                                    for i, q in enumerate(QUESTIONS)])


def _pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": f"q{i}", "messages": [{"role": "user", "content": q}], "responses": ["Sure, here it is.", "No."]}
        for i, q in enumerate(QUESTIONS)])


def _hh_rows(tmp_path):
    # hh-rlhf rows carry no id: score shards them by their content.
    return write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": f"\n\nHuman: {q}\n\nAssistant: Here is a careful answer.",
         "rejected": f"\n\nHuman: {q}\n\nAssistant: Go away."} for q in QUESTIONS])


def _run(stage: str, tmp_path, model, pm, out, shard):
    if stage == "revise":
        revise.run(revise.ReviseConfig(prompts=str(_prompts(tmp_path)), out=str(out), model=str(model), rounds=1,
                                       max_new_tokens=6, batch_size=2, limit=LIMIT, shard=shard))
    elif stage == "sample":
        sample.run(sample.SampleConfig(prompts=str(_prompts(tmp_path)), out=str(out), model=str(model),
                                       max_new_tokens=6, batch_size=2, limit=LIMIT, shard=shard))
    elif stage == "label":
        label.run(label.LabelConfig(pairs=str(_pairs(tmp_path)), out=str(out), model=str(model), batch_size=2,
                                    limit=LIMIT, shard=shard))
    else:
        score.run(score.ScoreConfig(pm=str(pm), file=str(_hh_rows(tmp_path)), out=str(out), batch_size=2,
                                    shard=shard))
    return read_jsonl(out)


def _without_shard(rows: list[dict]) -> list[dict]:
    """Rows as an unsharded job writes them: only the shard setting itself differs. A PM's rewards are compared
    to 5 decimals: a row padded in another batch sums its floats in another order (differences near 1e-7)."""
    plain = []
    for row in rows:
        meta = {k: v for k, v in row["meta"].items() if k != "shard"}
        if "score" in meta:
            meta["score"] = {k: v for k, v in meta["score"].items() if k != "shard"}
        rewards = {k: round(row[k], 5) for k in ("reward_chosen", "reward_rejected") if k in row}
        plain.append({**row, **rewards, "meta": meta})
    return plain


def _order(row: dict):
    return row["meta"]["score"]["row"] if "score" in row["meta"] else row["id"]


@pytest.mark.parametrize("stage", ["revise", "sample", "label", "score"])
def test_shards_together_write_what_one_job_writes(stage, tmp_path, tiny_model, tiny_pm):
    whole = _run(stage, tmp_path, tiny_model, tiny_pm, tmp_path / "whole.jsonl", None)
    parts = [_run(stage, tmp_path, tiny_model, tiny_pm, tmp_path / f"part{k}.jsonl", f"{k}/{SHARDS}")
             for k in range(SHARDS)]
    assert all(parts), [len(p) for p in parts]  # every part holds rows: the split is real
    merged = [row for part in parts for row in part]  # what `cat` of the outputs holds
    assert sorted(_without_shard(merged), key=_order) == sorted(_without_shard(whole), key=_order)
    assert {row["meta"].get("shard") or row["meta"]["score"]["shard"] for row in parts[1]} == {f"1/{SHARDS}"}


def test_a_shard_is_part_of_the_resume_settings(tmp_path, tiny_model):
    out = tmp_path / "part.jsonl"
    _run("sample", tmp_path, tiny_model, None, out, f"0/{SHARDS}")
    with pytest.raises(UsageError, match=r"shard: '0/2' there, '1/2' now"):
        _run("sample", tmp_path, tiny_model, None, out, f"1/{SHARDS}")


def test_the_part_of_a_row_depends_on_its_id_only():
    ids = [f"row-{i}" for i in range(300)]
    parts = [[i for i in ids if in_shard(i, f"{k}/4")] for k in range(4)]
    assert sorted(i for part in parts for i in part) == sorted(ids)  # each row in exactly one part
    assert all(50 < len(part) < 100 for part in parts)  # and the parts are about even
    # The same id lands in the same part whatever surrounds it (a hash of the id, not a position).
    assert [in_shard(i, "2/4") for i in reversed(ids)] == [in_shard(i, "2/4") for i in ids][::-1]
    assert in_shard("anything", None)


@pytest.mark.parametrize("value, message", [("3/3", "K counts from 0 and must be below N"),
                                            ("1-4", "expected K/N"), ("a/b", "expected K/N"),
                                            ("0/0", "must be below N")])
def test_a_bad_shard_is_refused_before_any_work(value, message):
    with pytest.raises(UsageError, match=message):
        parse_shard(value)


def test_the_command_line_refuses_a_bad_shard_with_exit_2(tmp_path):
    result = caictl("revise", "--shard", "4/4", "-o", tmp_path / "out.jsonl", check=False, input="")
    assert result.returncode == 2 and "--shard '4/4'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.jsonl").exists()
