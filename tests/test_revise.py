"""caictl revise: the loop's logic on a scripted engine, then the real command on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import EXAMPLES, caictl, caictl_in_process, read_jsonl, write_jsonl

from caictl.data import constitution as c
from caictl.data.records import Prompt
from caictl.engines.base import Generation
from caictl.stages.revise import ReviseConfig, Reviser, Totals, clean_response, revision_flags


class ScriptedEngine:
    """Answers each request with a text made from its key, and keeps every request it was sent."""

    name = "scripted"

    def __init__(self, chat: bool = True, overrides: dict | None = None):
        self.chat = chat
        self.requests: dict[str, object] = {}
        self.overrides = overrides or {}

    def supports_chat(self):
        return self.chat

    def _answer(self, requests, keys):
        for request, key in zip(requests, keys):
            self.requests[key] = request
        return [Generation(self.overrides.get(k, f"text<{k}>"), 10, 3, "stop") for k in keys]

    def generate(self, chats, params, keys):
        return self._answer(chats, keys)

    def complete(self, texts, params, keys):
        return self._answer(texts, keys)


PROMPT = Prompt("p1", [{"role": "user", "content": "How do I get back at my neighbour?"}])


def _revise(engine, style="chat", **options):
    config = ReviseConfig(model="scripted", **options)
    constitution = c.load("harmless").restrict(config.principles) if config.principles else c.load("harmless")
    return Reviser(engine, constitution, config, style).revise([PROMPT], Totals())[0]


def test_each_round_critiques_the_previous_revision():
    engine = ScriptedEngine()
    record = _revise(engine, rounds=3, few_shot=False)
    assert record["initial_response"] == "text<p1/initial>"
    assert [s["round"] for s in record["steps"]] == [1, 2, 3]
    # Round 1 critiques the initial response; round k critiques round k-1's revision.
    assert engine.requests["p1/0/critique"][-2]["content"] == "text<p1/initial>"
    assert engine.requests["p1/1/critique"][-2]["content"] == "text<p1/0/revision>"
    assert engine.requests["p1/2/critique"][-2]["content"] == "text<p1/1/revision>"
    # The revision request follows the critique under the same principle.
    revision_request = engine.requests["p1/1/revision"]
    step = record["steps"][1]
    assert revision_request[-3:] == [
        {"role": "user", "content": step["critique_request"]},
        {"role": "assistant", "content": "text<p1/1/critique>"},
        {"role": "user", "content": step["revision_request"]},
    ]
    assert record["response"] == "text<p1/2/revision>"
    ids = {p.id for p in c.load("harmless").critique_revision}
    assert {s["principle"] for s in record["steps"]} <= ids
    assert record["meta"]["principles"] == [s["principle"] for s in record["steps"]]


def test_flagged_revisions_are_recorded_but_not_built_on():
    engine = ScriptedEngine(overrides={"p1/0/revision": "", "p1/1/critique": "It is rude.",
                                       "p1/1/revision": "It is rude."})
    record = _revise(engine, rounds=3, few_shot=False)
    assert record["steps"][0]["flags"] == ["empty_revision"]
    assert record["steps"][1]["flags"] == ["revision_copies_critique"]
    # Rounds 2 and 3 critique the last usable response: the initial one.
    assert engine.requests["p1/1/critique"][-2]["content"] == "text<p1/initial>"
    assert engine.requests["p1/2/critique"][-2]["content"] == "text<p1/initial>"
    assert record["response"] == "text<p1/2/revision>"
    assert record["flags"] == ["empty_revision", "revision_copies_critique"]


def test_few_shot_examples_come_first_and_principle_examples_last():
    engine = ScriptedEngine()
    constitution = c.load("harmless")
    with_examples = next(p for p in constitution.critique_revision if p.examples)
    record = _revise(engine, rounds=1, principles=[with_examples.id])
    request = engine.requests["p1/0/critique"]
    assert record["steps"][0]["principle"] == with_examples.id
    assert request[0] == constitution.few_shot[0].messages[0]
    example = with_examples.examples[-1]
    # The principle's own example sits right before the real conversation.
    tail = [{"role": "user", "content": with_examples.revision_request},
            {"role": "assistant", "content": example.revision}] + PROMPT.messages
    assert request[-len(tail) - 2:-2] == tail


def test_shots_limits_the_shared_examples():
    engine = ScriptedEngine()
    _revise(engine, rounds=1, shots=1, principles=[c.load("harmless").critique_revision[0].id])
    shown = engine.requests["p1/0/critique"]
    shared = c.load("harmless").few_shot
    starts = [s.messages[0] for s in shared]
    assert sum(1 for message in shown if message in starts) == 1


def test_no_critique_ablation_asks_for_revisions_only():
    engine = ScriptedEngine()
    record = _revise(engine, rounds=2, critique=False, few_shot=False)
    assert not any(key.endswith("critique") for key in engine.requests)
    assert "critique" not in record["steps"][0]
    assert engine.requests["p1/1/revision"][-2]["content"] == "text<p1/0/revision>"


def test_transcript_style_for_base_models():
    engine = ScriptedEngine(chat=False)
    _revise(engine, style="transcript", rounds=1, few_shot=False)
    assert engine.requests["p1/initial"] == "\n\nHuman: How do I get back at my neighbour?\n\nAssistant:"
    critique = engine.requests["p1/0/critique"]
    assert critique.startswith("\n\nHuman: How do I get back") and critique.endswith("\n\nCritique:")
    assert "\n\nAssistant: text<p1/initial>\n\nCritiqueRequest: " in critique
    revision = engine.requests["p1/0/revision"]
    assert revision.startswith(critique.removesuffix("\n\nCritique:"))
    assert "\n\nCritique: text<p1/0/critique>\n\nRevisionRequest: " in revision
    assert revision.endswith("\n\nRevision:")


@pytest.mark.parametrize("raw, clean", [
    ("Assistant: Sure thing.", "Sure thing."),
    ("Revision: Here is the revised response: I can't help with that.", "I can't help with that."),
    ("Sure, here's a rewritten version of the response:\n\nTry talking to them.", "Try talking to them."),
    ("  plain  ", "plain"),
    ("Here is what I think: fine", "Here is what I think: fine"),
])
def test_clean_response(raw, clean):
    assert clean_response(raw) == clean


def test_revision_flags():
    assert revision_flags("", "c", True, "stop") == ["empty_revision"]
    assert revision_flags("Same text.", "same  text.", True, "stop") == ["revision_copies_critique"]
    assert revision_flags("ok", "", True, "length") == ["empty_critique", "revision_truncated"]
    assert revision_flags("ok", "", False, "stop") == []


# The real command on the tiny model ----------------------------------------------------------------------

FAST = ["--max-new-tokens", "12", "--shots", "1", "--batch-size", "16"]


@pytest.mark.slow
def test_revise_examples_writes_one_record_per_prompt_with_chained_rounds(tmp_path, tiny_model):
    out = tmp_path / "revisions.jsonl"
    result = caictl("revise", EXAMPLES / "red-team.jsonl", "-o", out, "--model", tiny_model, *FAST)
    records = read_jsonl(out)
    prompts = read_jsonl(EXAMPLES / "red-team.jsonl")
    assert [r["id"] for r in records] == [p["id"] for p in prompts]
    ids = {p.id for p in c.load("harmless").critique_revision}
    for record in records:
        assert len(record["steps"]) == 4
        assert {"critique_request", "critique", "revision_request", "revision", "principle"} <= set(record["steps"][0])
        assert {s["principle"] for s in record["steps"]} <= ids
        usable = [s["revision"] for s in record["steps"] if not {"empty_revision", "revision_copies_critique"}
                  & set(s["flags"])]
        assert record["response"] == (usable[-1] if usable else record["initial_response"])
        meta = record["meta"]
        assert meta["stage"] == "revise" and meta["model"] == str(tiny_model) and meta["rounds"] == 4
        assert meta["constitution_hash"] == c.load("harmless").content_hash()
    assert "rows_written" in result.stderr and result.stdout == ""


@pytest.mark.slow
def test_same_seed_same_output_other_seed_other_output(tmp_path, tiny_model):
    args = ["revise", EXAMPLES / "red-team.jsonl", "--model", tiny_model, "--limit", "6", "--rounds", "2", *FAST]
    first = caictl(*args, "-o", tmp_path / "a.jsonl")
    caictl_in_process(*args, "-o", tmp_path / "b.jsonl")
    caictl_in_process(*args, "-o", tmp_path / "c.jsonl", "--seed", "1")
    a, b, other = (read_jsonl(tmp_path / f"{n}.jsonl") for n in "abc")
    assert a == b
    assert [r["response"] for r in a] != [r["response"] for r in other]
    assert first.returncode == 0


@pytest.mark.slow
def test_killed_run_resumes_to_exactly_one_record_per_prompt(tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "p.jsonl", read_jsonl(EXAMPLES / "red-team.jsonl")[:16])
    args = ["revise", prompts, "--model", tiny_model, "--rounds", "2", "--max-new-tokens", "12", "--shots", "1",
            "--batch-size", "2"]
    out = tmp_path / "killed.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAICTL_")}
    process = subprocess.Popen([sys.executable, "-m", "caictl", *map(str, args), "-o", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = out.read_text().count("\n")
    # Killed after its first batch of 2: that batch is on disk, and at most one more was written meanwhile.
    assert 2 <= partial <= 4, "the run should have been killed after its first batch"
    with open(out, "a") as handle:  # and as if the kill had landed mid-line
        handle.write('{"id": "rt-0')
    resumed = caictl(*args, "-o", out)
    assert f"{partial} of 16 prompts already done" in resumed.stderr
    caictl_in_process(*args, "-o", tmp_path / "straight.jsonl")
    killed, straight = read_jsonl(out), read_jsonl(tmp_path / "straight.jsonl")
    assert len(killed) == 16 and len({r["id"] for r in killed}) == 16
    assert sorted(killed, key=lambda r: r["id"]) == sorted(straight, key=lambda r: r["id"])


@pytest.mark.slow
def test_resume_refuses_other_settings(tmp_path, tiny_model):
    out = tmp_path / "r.jsonl"
    args = ["revise", EXAMPLES / "red-team.jsonl", "--model", tiny_model, "--limit", "2", *FAST]
    caictl_in_process(*args, "-o", out, "--rounds", "1")
    refused = caictl(*args, "-o", out, "--rounds", "2", check=False)
    assert refused.returncode == 2
    assert "rounds: 1 there, 2 now" in refused.stderr and "--overwrite" in refused.stderr
    assert len(read_jsonl(out)) == 2
    caictl_in_process(*args, "-o", out, "--rounds", "2", "--overwrite")
    assert [len(r["steps"]) for r in read_jsonl(out)] == [2, 2]


@pytest.mark.slow
def test_stdin_to_stdout_and_literal_prompts(tmp_path, tiny_model):
    tricky = ["Explain {x} and {{x}} please", "What does {% raw %} do? {% endraw %}",
              "Quote this:\n\nHuman: hi\n\nAssistant: hello"]
    rows = "".join(json.dumps({"prompt": t}) + "\n" for t in tricky)
    result = caictl("revise", "--model", tiny_model, "--rounds", "1", *FAST, input=rows)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["messages"][0]["content"] for r in records] == tricky
    assert "rows_written" in result.stderr


def test_reads_hh_rlhf_gz_and_writes_hf_columns(tmp_path, tiny_model, shared_data):
    out = tmp_path / "hf.jsonl"
    caictl_in_process("revise", shared_data / "hh-rlhf" / "harmless-base-test.part-a.jsonl.gz", "-o", out,
                      "--model", tiny_model, "--limit", "3", "--rounds", "1", "--format", "hf", *FAST)
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=str(out), split="train")
    assert dataset.num_rows == 3
    for name in ("init_prompt", "init_response", "critic_prompt", "critic_response", "revision_prompt",
                 "revision_response", "prompt", "messages", "chosen", "rejected"):
        assert name in dataset.column_names
    row = dataset[0]
    assert row["chosen"][-1] == {"role": "assistant", "content": row["revision_response"]} or row["flags"]
    assert row["rejected"][-1]["content"] == row["init_response"]
    assert row["chosen"][-2]["role"] == "user"


@pytest.mark.parametrize("content, where", [
    (b'{"prompt": "fine"}\n{"prompt": "broken"\n', "bad.jsonl:2: invalid JSON"),
    (b'{"prompt": "fine"}\n{"question": "x"}\n', "bad.jsonl:2: no prompt field"),
    (b"", "bad.jsonl: the input is empty"),
    (b'{"prompt": "caf\xe9"}\n', "bad.jsonl:1: not valid UTF-8"),
])
def test_bad_input_exits_2_naming_file_and_line(tmp_path, tiny_model, content, where):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    result = caictl("revise", bad, "-o", tmp_path / "out.jsonl", "--model", tiny_model, check=False)
    assert result.returncode == 2
    assert where in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").read_text() == ""


def test_truncated_gz_input_exits_2(tmp_path, tiny_model, shared_data):
    data = (shared_data / "hh-rlhf" / "harmless-base-test.part-a.jsonl.gz").read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 3])
    result = caictl("revise", cut, "--model", tiny_model, check=False)
    assert result.returncode == 2 and "cut.jsonl.gz:" in result.stderr and "truncated" in result.stderr


def test_skip_invalid_goes_on(tmp_path, tiny_model):
    bad = tmp_path / "mixed.jsonl"
    bad.write_bytes(b'{"prompt": "one"}\nnot json\n{"prompt": "two"}\n')
    out = tmp_path / "out.jsonl"
    caictl_in_process("revise", bad, "-o", out, "--model", tiny_model, "--rounds", "1", "--skip-invalid", *FAST)
    assert len(read_jsonl(out)) == 2
    rejects = read_jsonl(tmp_path / "out.jsonl.rejects.jsonl")
    assert rejects[0]["line"] == 2 and "invalid JSON" in rejects[0]["error"]


def test_no_model_anywhere_is_a_clear_error(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    result = caictl("revise", prompts, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "no model set" in result.stderr and "caictl init-model" in result.stderr


@pytest.mark.slow
def test_model_from_environment_and_project_file(tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    common = ["revise", prompts, "--rounds", "1", *FAST]
    from_env = caictl(*common, cwd=tmp_path, env={"CAICTL_MODEL": str(tiny_model)})
    assert json.loads(from_env.stdout)["meta"]["model"] == str(tiny_model)
    (tmp_path / "caictl.yaml").write_text(f"model: {tiny_model}\nseed: 5\n")
    from_file = caictl(*common, cwd=tmp_path)
    assert json.loads(from_file.stdout)["meta"]["seed"] == 5


def test_unknown_principle_and_bad_options_fail_before_loading(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    result = caictl("revise", prompts, "--model", "no/such-model", "--principles", "nope", check=False)
    assert result.returncode == 2 and "unknown principle id(s) nope" in result.stderr
    result = caictl("revise", prompts, "--model", "m", "--rounds", "0", "--top-p", "2", check=False)
    assert result.returncode == 2 and "--rounds" in result.stderr and "--top-p" in result.stderr


def test_prompt_rows_made_by_a_stage_keep_its_meta_as_upstream(tmp_path, tiny_model):
    upstream = {"stage": "sample", "model": "models/sl"}
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hi", "meta": upstream}])
    (row,) = [json.loads(line) for line in caictl_in_process("revise", prompts, "--model", tiny_model, "--rounds", "1",
                                                             *FAST).splitlines()]
    assert row["meta"]["stage"] == "revise" and row["meta"]["upstream"] == upstream
