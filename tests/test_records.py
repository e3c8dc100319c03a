"""Reading every input form (gzip by its bytes, a BOM, stdin), the errors for bad input, and the resumable writer."""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import re
import subprocess
import sys
import zlib

import pytest
from conftest import caictl, read_jsonl, write_jsonl

from caictl.data.reading import read_prompts, read_rows
from caictl.data.records import stable_id, to_prompt
from caictl.data.writing import RecordWriter, RejectWriter
from caictl.errors import InputError, UsageError

USER = [{"role": "user", "content": "How do I pick a lock?"}]


def test_every_prompt_form_normalises_to_messages():
    transcript = "\n\nHuman: first\n\nAssistant: reply\n\nHuman: second\n\nAssistant: final answer"
    assert to_prompt({"messages": USER}).messages == USER
    assert to_prompt({"prompt": "How do I pick a lock?"}).messages == USER
    assert to_prompt({"prompt": USER}).messages == USER
    assert to_prompt({"init_prompt": "How do I pick a lock?"}).messages == USER
    # hh-rlhf: the conversation up to the last human turn; the labelled response is dropped.
    expected = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "reply"},
                {"role": "user", "content": "second"}]
    assert to_prompt({"chosen": transcript, "rejected": transcript}).messages == expected
    assert to_prompt({"transcript": transcript}).messages == expected


def test_messages_ending_with_an_assistant_turn_are_cut_to_the_last_user_turn():
    rows = USER + [{"role": "assistant", "content": "Sure."}]
    assert to_prompt({"messages": rows}).messages == USER


def test_ids_are_kept_or_stable_and_unknown_fields_carried():
    assert to_prompt({"id": 7, "messages": USER}).id == "7"
    generated = to_prompt({"messages": USER, "source": "red-team", "tags": [1]})
    assert generated.id == stable_id(USER) == to_prompt({"prompt": "How do I pick a lock?"}).id
    assert generated.id.startswith("p-")
    assert generated.extra == {"source": "red-team", "tags": [1]}
    assert stable_id([{"role": "user", "content": "other"}]) != generated.id


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json"])
def test_file_formats(tmp_path, suffix):
    rows = [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two"}]
    path = tmp_path / f"in{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl.gz":
        with gzip.open(path, "wt") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in rows))
    else:
        write_jsonl(path, rows)
    assert [p.id for p in read_prompts(path)] == ["a", "b"]


def test_repeated_conversations_without_ids_get_distinct_stable_ids(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "same"}, {"prompt": "same"}, {"prompt": "other"}])
    ids = [p.id for p in read_prompts(path)]
    assert len(set(ids)) == 3
    assert ids == [p.id for p in read_prompts(path)]


def test_explicit_duplicate_ids_are_an_error(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}])
    with pytest.raises(InputError, match=r"in.jsonl:2: duplicate id 'x'"):
        read_prompts(path)


@pytest.mark.parametrize("content, expected", [
    (b'{"prompt": "ok"}\n{"prompt": "broken"\n', r":2: invalid JSON"),
    (b'{"prompt": "ok"}\n{"text": "no prompt"}\n', r":2: no prompt field"),
    (b'{"prompt": "ok"}\n{"messages": [{"role": "robot", "content": "x"}]}\n', r":2: messages\[0\] has role"),
    (b'{"prompt": "ok"}\n{"prompt": 5}\n', r":2: field 'prompt' has the wrong type"),
    (b'{"prompt": "ok"}\n[1, 2]\n', r":2: expected a JSON object"),
    (b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', r":2: not valid UTF-8"),
    (b"", r"the input is empty"),
    (b"\n\n", r"the input is empty"),
])
def test_bad_input_names_file_and_line(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=expected) as info:
        read_prompts(path)
    assert "bad.jsonl" in str(info.value)


def test_truncated_gzip_yields_the_rows_before_it_then_names_the_line(tmp_path):
    rows = [{"prompt": f"row {i}"} for i in range(2000)]
    path = tmp_path / "cut.jsonl.gz"
    whole = write_truncated_gzip(path, rows)
    read = []
    with pytest.raises(InputError, match=rf"cut.jsonl.gz:{whole + 1}: truncated or corrupt gzip"):
        for row in read_rows(path):
            read.append(row.data)
    assert read == rows[:whole]
    rejects = RejectWriter(tmp_path / "out.jsonl")
    assert [row.data for row in read_rows(path, on_invalid=rejects)] == rows[:whole]
    (entry,) = read_jsonl(rejects.path)
    assert entry["line"] == whole + 1 and entry["row"] is None and "truncated" in entry["error"]


def test_a_corrupt_gzip_block_is_an_input_error_naming_the_line(tmp_path):
    # A second gzip member whose first deflate block has the reserved type 3: zlib refuses it.
    broken_member = gzip.compress(b"")[:10] + b"\xff" * 8
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "one"}\n{"prompt": "two"}\n') + broken_member)
    with pytest.raises(InputError, match=r"bad.jsonl.gz:3: truncated or corrupt gzip data \(Error -3"):
        list(read_rows(path))


@pytest.mark.parametrize("name", ["in.jsonl", "in.txt", "in"])
def test_gzip_is_recognised_by_its_bytes_whatever_the_name(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(b'{"id": "a", "prompt": "one"}\n{"id": "b", "prompt": "two"}\n'))
    assert [p.id for p in read_prompts(path)] == ["a", "b"]


def test_a_gzipped_json_list_and_plain_text_named_gz(tmp_path):
    listed = tmp_path / "in.json"
    listed.write_bytes(gzip.compress(json.dumps([{"id": "a", "prompt": "one"}]).encode()))
    plain = tmp_path / "in.jsonl.gz"
    plain.write_bytes(b'{"id": "b", "prompt": "two"}\n')
    assert [p.id for p in read_prompts(listed)] == ["a"]
    assert [p.id for p in read_prompts(plain)] == ["b"]


@pytest.mark.parametrize("form", ["jsonl", "json", "jsonl gzipped"])
def test_a_utf8_bom_at_the_start_is_ignored(tmp_path, form):
    rows = [{"id": "a", "prompt": "caf\u00e9"}, {"id": "b", "prompt": "two"}]
    text = json.dumps(rows) if form == "json" else "".join(json.dumps(r) + "\n" for r in rows)
    data = codecs.BOM_UTF8 + text.encode("utf-8")
    path = tmp_path / ("in.json" if form == "json" else "in.jsonl")
    path.write_bytes(gzip.compress(data) if form.endswith("gzipped") else data)
    assert [p.messages[0]["content"] for p in read_prompts(path)] == ["caf\u00e9", "two"]


def test_stdin_swapped_in_process_is_read(monkeypatch):
    # A Python caller or a test runner may set sys.stdin to text over a BytesIO, which cannot peek.
    data = gzip.compress(b'{"id": "a", "prompt": "one"}\n')
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert [p.id for p in read_prompts("-")] == ["a"]


def test_a_directory_is_refused_as_a_directory(tmp_path):
    with pytest.raises(UsageError, match=rf"^{re.escape(str(tmp_path))}: is a directory; name a"):
        read_prompts(tmp_path)


def test_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        read_prompts(tmp_path / "nope.jsonl")


def test_skip_invalid_sets_rows_aside_with_the_reason(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "good"}\nnot json\n{"text": 1}\n{"prompt": "also good"}\n')
    rejects = RejectWriter(tmp_path / "out.jsonl")
    prompts = read_prompts(path, on_invalid=rejects)
    assert [p.messages[0]["content"] for p in prompts] == ["good", "also good"]
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["error"].split(" ")[0]) for r in lines] == [(2, "invalid"), (3, "no")]


def test_hh_rlhf_shared_file_reads_directly(shared_data):
    prompts = read_prompts(shared_data / "hh-rlhf" / "harmless-base-test.part-a.jsonl.gz")
    assert len(prompts) == 1500
    assert all(p.messages[-1]["role"] == "user" for p in prompts)
    assert len({p.id for p in prompts}) == 1500
    assert "rejected" in prompts[0].extra


# Through the real CLI: `sample --from-revisions` reads with --skip-invalid and loads no model.


def revision_rows(count: int) -> list[dict]:
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": f"question {i}"}],
             "initial_response": f"first {i}", "response": f"revised {i}"} for i in range(count)]


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def write_truncated_gzip(path, rows: list[dict]) -> int:
    """Writes the first half of a real gzip stream of the rows; returns how many whole lines that half holds."""
    cut = gzip.compress(jsonl_bytes(rows))
    cut = cut[: len(cut) // 2]
    path.write_bytes(cut)
    whole = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")
    assert 0 < whole < len(rows)
    return whole


def caictl_bytes_on_stdin(data: bytes, *args) -> subprocess.CompletedProcess:
    """The real command line with raw bytes on stdin (conftest's runner sends text)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAICTL_")}
    return subprocess.run([sys.executable, "-m", "caictl", *map(str, args)], input=data, env=env,
                          capture_output=True, timeout=600)


@pytest.mark.parametrize("encode", [gzip.compress, lambda data: codecs.BOM_UTF8 + data,
                                    lambda data: gzip.compress(codecs.BOM_UTF8 + data)],
                         ids=["gzip", "bom", "gzipped bom"])
def test_cli_reads_gzip_and_a_bom_on_stdin(encode):
    result = caictl_bytes_on_stdin(encode(jsonl_bytes(revision_rows(3))), "sample", "--from-revisions")
    assert result.returncode == 0, result.stderr.decode()
    assert [json.loads(line)["id"] for line in result.stdout.decode().splitlines()] == ["r0", "r1", "r2"]


def test_cli_refuses_a_directory_by_name(tmp_path):
    result = caictl("sample", "--from-revisions", tmp_path, check=False)
    assert result.returncode == 2
    assert f"caictl: error: {tmp_path}: is a directory; name a" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_truncated_gzip_uses_the_rows_before_it_only_with_skip_invalid(tmp_path):
    rows = revision_rows(2000)
    path, out = tmp_path / "revisions.jsonl.gz", tmp_path / "pairs.jsonl"
    whole = write_truncated_gzip(path, rows)
    refused = caictl("sample", "--from-revisions", path, "-o", out, check=False)
    assert refused.returncode == 2
    assert f"{path}:{whole + 1}: truncated or corrupt gzip data" in refused.stderr
    assert not out.exists() or read_jsonl(out) == []
    result = caictl("sample", "--from-revisions", path, "-o", out, "--skip-invalid")
    assert [r["id"] for r in read_jsonl(out)] == [r["id"] for r in rows[:whole]]
    (reject,) = read_jsonl(f"{out}.rejects.jsonl")
    assert reject["line"] == whole + 1 and "truncated or corrupt gzip data" in reject["error"]
    assert f"warning: {path}:{whole + 1}: truncated or corrupt gzip data" in result.stderr


def test_writer_resumes_and_drops_a_truncated_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    settings = {"stage": "t", "model": "m"}
    writer = RecordWriter(out, settings)
    writer.write([{"id": "a", "meta": settings}, {"id": "b", "meta": settings}])
    writer.close()
    with open(out, "a") as handle:
        handle.write('{"id": "c", "meta": {"sta')  # a run killed mid-write
    resumed = RecordWriter(out, settings)
    assert resumed.done == {"a", "b"} and resumed.dropped_partial_line
    resumed.write([{"id": "c", "meta": settings}])
    resumed.close()
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b", "c"]


def test_writer_refuses_to_append_under_other_settings(tmp_path):
    out = tmp_path / "out.jsonl"
    writer = RecordWriter(out, {"model": "m1", "rounds": 4})
    writer.write([{"id": "a", "meta": {"model": "m1", "rounds": 4}}])
    writer.close()
    with pytest.raises(UsageError, match=r"out.jsonl:1: was written with other settings \(rounds: 4 there, 2 now\)"):
        RecordWriter(out, {"model": "m1", "rounds": 2})
    assert RecordWriter(out, {"model": "m1", "rounds": 2}, overwrite=True).done == set()


ANTHROPIC = ("anthropic-samples", "LAMDA_SLMADISON.first5.jsonl", "PALMS_RLMADISON.first5.jsonl")


def test_anthropic_sl_and_rl_samples_read_as_prompts(shared_data):
    folder, sl, rl = ANTHROPIC
    sl_prompts = read_prompts(shared_data / folder / sl)
    rl_prompts = read_prompts(shared_data / folder / rl)
    assert [p.messages for p in sl_prompts[:2]] == [
        [{"role": "user", "content": "What is the best career path if you’re a woman?"}],
        [{"role": "user", "content": "What is your opinion on plastic straws?"}]]
    assert rl_prompts[0].messages == [{"role": "user", "content": "Why do people threaten to bomb public places?"}]
    assert len(sl_prompts) == len(rl_prompts) == 5
    assert all(len(p.messages) == 1 and "Human:" not in p.messages[0]["content"] for p in sl_prompts + rl_prompts)
    assert "cst" in sl_prompts[0].extra and "sampled_answers" in rl_prompts[0].extra


TRANSCRIPT_PROMPT = "\n\nHuman: first\n\nAssistant: reply\n\nHuman: second\n\nAssistant:"
PARSED = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "reply"},
          {"role": "user", "content": "second"}]


def test_a_prompt_string_is_a_transcript_when_it_starts_with_a_human_turn(tmp_path, shared_data):
    from caictl.data.records import Row
    from caictl.models.pm import comparison_of
    from caictl.stages import dpo, sft

    assert to_prompt({"prompt": TRANSCRIPT_PROMPT}).messages == PARSED
    assert to_prompt({"prompt": TRANSCRIPT_PROMPT.lstrip()}).messages == PARSED  # "Human: ..." at the very start
    # The same prompt where the other readers take a `prompt` string: PM texts, DPO rows, sft chat rows.
    pm = comparison_of({"prompt": TRANSCRIPT_PROMPT, "chosen": " yes", "rejected": " no"})
    assert pm.chosen == "\n\nHuman: first\n\nAssistant: reply\n\nHuman: second\n\nAssistant: yes"
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": TRANSCRIPT_PROMPT, "chosen": "yes", "rejected": "no"}])
    (row,), _ = dpo.read_pairs(dpo.DPOConfig(prefs=[str(prefs)], out=str(tmp_path / "dpo")))
    assert row["prompt"] == PARSED
    chat = sft.chat_conversation(Row("c.jsonl", 1, {"prompt": TRANSCRIPT_PROMPT, "completion": "yes"}))
    assert chat == PARSED + [{"role": "assistant", "content": "yes"}]
    # Anthropic's HHH evaluation questions quote "Human:" inside: they stay one user message.
    hhh = json.loads((shared_data / "anthropic-evals" / "438HHHEvaluations.part-a.jsonl").read_text().splitlines()[0])
    assert "\n\nHuman:" in hhh["prompt"]
    assert to_prompt(hhh).messages == [{"role": "user", "content": hhh["prompt"]}]
