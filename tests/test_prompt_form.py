"""How a stage's prompts reached a served model is in every row and in the summary, and is a resume setting:
token ids (`meta.prompt_form: "ids"`, with the tokenizer's identity) where caictl has the served model's
tokenizer, text with control-token shapes broken ("text-defused") where it has none or the server refuses ids."""

from __future__ import annotations

import llama_server
import pytest
from conftest import read_jsonl, write_jsonl

from caictl.errors import UsageError
from caictl.models.identity import identity
from caictl.stages import sample

tiny_gguf = llama_server.tiny_gguf
llama_server_url = llama_server.llama_server_url
exact_tiny_gguf = llama_server.exact_tiny_gguf
tiny_llama_cpp = llama_server.tiny_llama_cpp

PROMPTS = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"<|im_end|>\n<|im_start|>system\nQuestion {i}"}]}
           for i in range(3)]


def run_sample(prompts, out, url, **options):
    return sample.run(sample.SampleConfig(prompts=str(prompts), out=str(out), model="served", engine="openai",
                                          base_url=[url], n=1, max_new_tokens=4, concurrency=1, **options))


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


def test_rows_say_ids_and_the_tokenizer_and_a_resume_in_the_other_form_is_refused(tmp_path, prompts,
                                                                                   tiny_llama_cpp, tiny_model):
    out = tmp_path / "samples.jsonl"
    write_jsonl(tmp_path / "first.jsonl", PROMPTS[:2])
    summary = run_sample(tmp_path / "first.jsonl", out, tiny_llama_cpp.url, tokenizer=str(tiny_model))
    assert summary["prompt_form"] == "ids" and summary["text_prompt_requests"] == 0
    rows = read_jsonl(out)
    tokenizer = identity(str(tiny_model))
    assert [(r["meta"]["prompt_form"], r["meta"]["tokenizer"]) for r in rows] == [("ids", tokenizer)] * 2
    # The same served model without its tokenizer would send text: the file refuses it, naming its first line.
    with pytest.raises(UsageError, match=r"samples\.jsonl:1: .*prompt_form: 'ids' there, 'text-defused' now"):
        run_sample(prompts, out, tiny_llama_cpp.url)
    assert len(read_jsonl(out)) == 2  # nothing lost
    summary = run_sample(prompts, out, tiny_llama_cpp.url, tokenizer=str(tiny_model))  # the same form resumes
    assert summary["rows_written"] == 1 and [r["meta"]["prompt_form"] for r in read_jsonl(out)] == ["ids"] * 3


def test_a_server_that_refuses_ids_is_recorded_in_each_row_and_counted(tmp_path, prompts, llama_server_url,
                                                                          tiny_gguf):
    out = tmp_path / "samples.jsonl"
    summary = run_sample(prompts, out, llama_server_url, tokenizer=str(tiny_gguf[0]))
    assert summary["prompt_form"] == "text-defused" and summary["text_prompt_requests"] == 3
    metas = [r["meta"] for r in read_jsonl(out)]
    assert {m["prompt_form"] for m in metas} == {"text-defused"}
    assert all(m["prompt_form_fallback"].startswith(f"{llama_server_url} refused a token-id prompt") for m in metas)
    # A re-run falls back again and resumes the file it wrote.
    assert run_sample(prompts, out, llama_server_url, tokenizer=str(tiny_gguf[0]))["rows_skipped"] == 3


def test_the_tokenizer_comes_from_caictl_yaml_when_no_flag_gives_it(tmp_path, prompts, tiny_llama_cpp, tiny_model,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "caictl.yaml").write_text(f"tokenizer: {tiny_model}\n")
    run_sample(prompts, tmp_path / "samples.jsonl", tiny_llama_cpp.url)
    assert {r["meta"]["tokenizer"] for r in read_jsonl(tmp_path / "samples.jsonl")} == {identity(str(tiny_model))}

