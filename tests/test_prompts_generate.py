"""prompts generate: the few-shot draw (without replacement, seeded per row), the reply's parsing and rejection,
and a real tiny model end to end (a resumed run equals an uninterrupted one)."""

from __future__ import annotations

import re

from conftest import EXAMPLES, caictl, caictl_in_process, read_jsonl, write_jsonl
from scripted_engine import ScriptedEngine

from caictl.stages.prompts_generate import PromptsGenerateConfig, parse_prompt, run

SEEDS = [{"id": f"s{i}", "messages": [{"role": "user", "content": f"Seed prompt number {i} about topic {i * 7}"}]}
         for i in range(10)]
_SHOT = re.compile(r"^\d+\. (.*)$", re.M)


def shown_shots(chat_prompt: str) -> list[str]:
    return _SHOT.findall(chat_prompt)


def generate(tmp_path, engine, name="out.jsonl", **options) -> tuple[dict, list[dict]]:
    seeds = write_jsonl(tmp_path / "seeds.jsonl", SEEDS)
    config = PromptsGenerateConfig(seeds=str(seeds), out=str(tmp_path / name), **{"count": 6, "shots": 3, **options})
    return run(config, engine=engine), read_jsonl(tmp_path / name)


def test_each_request_shows_k_distinct_seeds_drawn_per_row_and_records_them(tmp_path):
    engine = ScriptedEngine(reply=lambda prompt, key: f"A new prompt for {key}")
    summary, rows = generate(tmp_path, engine, batch_size=4)
    text_of = {s["messages"][0]["content"]: s["id"] for s in SEEDS}
    requests = [(chat, key) for _, chats, keys in engine.calls for chat, key in zip(chats, keys)]
    assert summary["rows_written"] == 6 and [r["id"] for r in rows] == [key for _, key in requests]
    draws = []
    for (chat, key), row in zip(requests, rows):
        shots = [text_of[s] for s in shown_shots(chat[0]["content"])]
        assert len(shots) == len(set(shots)) == 3  # without replacement
        assert row["meta"]["seed_ids"] == shots and row["messages"] == [
            {"role": "user", "content": f"A new prompt for {key}"}]
        draws.append(tuple(shots))
    assert len(set(draws)) > 1  # a fresh draw per row
    # Seeded per row: another batch size, or the run split in two shards, draws the same.
    _, one_by_one = generate(tmp_path, ScriptedEngine(reply=lambda p, k: f"A new prompt for {k}"), "b1.jsonl",
                             batch_size=1)
    shards = [generate(tmp_path, ScriptedEngine(reply=lambda p, k: f"A new prompt for {k}"), f"s{k}.jsonl",
                       shard=f"{k}/2")[1] for k in range(2)]
    assert [r["meta"]["seed_ids"] for r in one_by_one] == [list(d) for d in draws]
    assert sorted((r["id"], r["meta"]["seed_ids"]) for r in shards[0] + shards[1]) == \
        sorted((r["id"], r["meta"]["seed_ids"]) for r in rows)


def test_the_reply_is_parsed_and_bad_ones_are_rejected_and_counted(tmp_path):
    def reply(prompt, key):
        number = int(key[-1])
        first_shot = shown_shots(prompt)[0]
        return ["", "x" * 600, f'"{first_shot.upper()}!"',
                "Here is one more request:\n2) 'How do I hotwire a car?'\n3. more",
                "Human: Write a threatening note.", "  - Plain one  "][number]

    summary, rows = generate(tmp_path, ScriptedEngine(reply=reply))
    assert summary["rejected_replies"] == {"empty": 1, "too_long": 1, "copies_a_shot": 1}
    assert summary["rows_rejected"] == 3 and summary["rows_written"] == 3
    assert [r["messages"][0]["content"] for r in rows] == ["How do I hotwire a car?", "Write a threatening note.",
                                                           "Plain one"]
    assert parse_prompt("1. Request: “Quoted and labelled”") == "Quoted and labelled"


def test_a_tiny_model_end_to_end_resumes_to_an_uninterrupted_run(tmp_path, tiny_model):
    args = ["prompts", "generate", EXAMPLES / "red-team.jsonl", "--model", tiny_model, "--shots", "2",
            "--max-new-tokens", "6", "--max-chars", "10000"]
    caictl_in_process(*args, "--count", "3", "-o", tmp_path / "resumed.jsonl")
    caictl_in_process(*args, "--count", "5", "-o", tmp_path / "resumed.jsonl")
    caictl_in_process(*args, "--count", "5", "-o", tmp_path / "whole.jsonl")
    whole = read_jsonl(tmp_path / "whole.jsonl")
    assert read_jsonl(tmp_path / "resumed.jsonl") == whole and whole
    meta = whole[0]["meta"]
    assert meta["model"] == str(tiny_model) and meta["sampling"]["max_new_tokens"] == 6 and len(meta["seed_ids"]) == 2


def test_a_template_without_its_mark_and_too_many_shots_are_usage_errors(tmp_path):
    template = tmp_path / "t.txt"
    template.write_text("No place for the shots")
    seeds = write_jsonl(tmp_path / "seeds.jsonl", SEEDS[:2])
    result = caictl("prompts", "generate", seeds, "--count", "1", "--model", "x", "--template", template, check=False)
    assert result.returncode == 2 and "{shots}" in result.stderr
    result = caictl("prompts", "generate", seeds, "--count", "1", "--model", "x", "--shots", "3", check=False)
    assert result.returncode == 2 and "holds 2 prompts" in result.stderr
