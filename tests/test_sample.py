"""caictl sample: n responses per prompt, seeded per response, resumable; pairs straight from revisions."""

from __future__ import annotations

import json

from conftest import EXAMPLES, caictl, caictl_in_process, read_jsonl, write_jsonl

from caictl.data.conversation import parse_transcript

FAST = ["--max-new-tokens", "10", "--batch-size", "8"]


def test_n_responses_per_prompt_deterministic_for_a_seed(tmp_path, tiny_model):
    args = ["sample", EXAMPLES / "red-team.jsonl", "--model", tiny_model, "-n", "3", "--limit", "5", *FAST]
    caictl_in_process(*args, "-o", tmp_path / "a.jsonl")
    caictl_in_process(*args, "-o", tmp_path / "b.jsonl")
    caictl_in_process(*args, "-o", tmp_path / "c.jsonl", "--seed", "9")
    a, b, c = (read_jsonl(tmp_path / f"{name}.jsonl") for name in "abc")
    assert a == b and len(a) == 5
    assert all(len(r["responses"]) == 3 and len(set(r["responses"])) == 3 for r in a)
    assert [r["responses"] for r in a] != [r["responses"] for r in c]
    assert a[0]["meta"]["stage"] == "sample" and a[0]["meta"]["n"] == 3
    assert [r["id"] for r in a] == [r["id"] for r in read_jsonl(EXAMPLES / "red-team.jsonl")[:5]]


def test_a_partial_run_resumes_to_what_an_uninterrupted_run_writes(tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "p.jsonl", read_jsonl(EXAMPLES / "helpful.jsonl")[:12])
    out = tmp_path / "pairs.jsonl"
    caictl_in_process("sample", prompts, "--model", tiny_model, "-o", out, "--limit", "5", *FAST)
    resumed = caictl("sample", prompts, "--model", tiny_model, "-o", out, *FAST)
    assert "5 of 12 prompts already done" in " ".join(resumed.stderr.split())
    caictl_in_process("sample", prompts, "--model", tiny_model, "-o", tmp_path / "straight.jsonl", *FAST)
    assert read_jsonl(out) == read_jsonl(tmp_path / "straight.jsonl")


def test_prompt_rows_made_by_a_stage_keep_its_meta_as_upstream(tmp_path, tiny_model):
    # Revise output read as prompts: its meta is revise's, kept under meta.upstream, the other fields carried.
    revise_meta = {"stage": "revise", "model": "models/sl", "rounds": 2}
    revisions = write_jsonl(tmp_path / "r.jsonl", [
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"Question {i}?"}], "initial_response": "bad",
         "steps": [], "response": "better", "meta": revise_meta} for i in range(2)])
    stdout = caictl_in_process("sample", revisions, "--model", tiny_model, "-n", "1", *FAST)
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [(r["meta"]["stage"], r["meta"]["upstream"], r["response"]) for r in rows] == \
        [("sample", revise_meta, "better")] * 2
    plain = caictl_in_process("sample", EXAMPLES / "red-team.jsonl", "--model", tiny_model, "-n", "1", "--limit", "1",
                              *FAST)
    assert "upstream" not in json.loads(plain)["meta"]


def test_pairs_from_revisions_need_no_model(tmp_path):
    revisions = write_jsonl(tmp_path / "r.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "q"}], "initial_response": "bad",
         "steps": [], "response": "better", "meta": {"model": "m"}},
        {"id": "b", "messages": [{"role": "user", "content": "q2"}], "initial_response": "same",
         "steps": [], "response": "same", "meta": {}},
    ])
    stdout = caictl_in_process("sample", "--from-revisions", revisions)
    rows = [__import__("json").loads(line) for line in stdout.splitlines()]
    assert [(r["id"], r["responses"]) for r in rows] == [("a", ["bad", "better"])]
    assert rows[0]["meta"]["upstream"] == {"model": "m"}
    # --limit counts the pairs already in OUT: a re-run resumes instead of appending more.
    more = write_jsonl(tmp_path / "more.jsonl", [
        {"id": f"m{i}", "messages": [{"role": "user", "content": f"q{i}"}], "initial_response": "bad",
         "steps": [], "response": f"better {i}", "meta": {}} for i in range(4)])
    for _ in range(2):
        caictl_in_process("sample", "--from-revisions", more, "--limit", "2", "-o", tmp_path / "pairs.jsonl")
    assert [r["id"] for r in read_jsonl(tmp_path / "pairs.jsonl")] == ["m0", "m1"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "messages": []}])
    result = caictl("sample", "--from-revisions", bad, check=False)
    assert result.returncode == 2 and "bad.jsonl:1: not a revise record" in result.stderr


def test_pairs_from_revise_hf_output(tmp_path, tiny_model):
    hf = tmp_path / "hf.jsonl"
    caictl_in_process("revise", EXAMPLES / "red-team.jsonl", "-o", hf, "--model", tiny_model, "--limit", "4",
                      "--rounds", "1", "--format", "hf", *FAST)
    rows = read_jsonl(hf)
    # --format hf ends `messages` with the final revision, or with the first answer when none was usable.
    expected = [(r["id"], r["messages"][:-1], [r["init_response"], r["messages"][-1]["content"]])
                for r in rows if r["messages"][-1]["content"] != r["init_response"]]
    assert expected
    stdout = caictl_in_process("sample", "--from-revisions", hf)
    pairs = [json.loads(line) for line in stdout.splitlines()]
    assert [(p["id"], p["messages"], p["responses"]) for p in pairs] == expected
    assert all(p["meta"]["upstream"]["format"] == "hf" for p in pairs)


def test_pairs_from_anthropic_sl_samples_and_their_prompts_sampled(tmp_path, tiny_model, shared_data):
    folder = shared_data / "anthropic-samples"
    sl = read_jsonl(folder / "LAMDA_SLMADISON.first5.jsonl")
    stdout = caictl_in_process("sample", "--from-revisions", folder / "LAMDA_SLMADISON.first5.jsonl")
    pairs = [json.loads(line) for line in stdout.splitlines()]
    # The first answer against the last round's revision, to the conversation in rl_prompt.
    assert [p["responses"] for p in pairs] == [[r["initial_response"][0]["sample"].strip(),
                                                r["cst"][-1]["revision"]["sample"].strip()] for r in sl]
    assert [p["messages"] for p in pairs] == [parse_transcript(r["rl_prompt"])[:1] for r in sl]
    # The RL-CAI samples' prompts are prompts like any other.
    stdout = caictl_in_process("sample", folder / "PALMS_RLMADISON.first5.jsonl", "--model", tiny_model, "-n", "1",
                               "--limit", "2", *FAST)
    assert [json.loads(line)["messages"] for line in stdout.splitlines()] == [
        [{"role": "user", "content": "Why do people threaten to bomb public places?"}],
        [{"role": "user", "content": "How do I make my classmates like me?"}]]
