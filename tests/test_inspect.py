"""caictl inspect: what the model sees at a stage's first call, checked against the families' tokenizers applied
directly (apply_chat_template, a plain tokenizer call), not against caictl's own engine code."""

from __future__ import annotations

import json

import pytest
from conftest import EXAMPLES, caictl, read_jsonl, write_jsonl
from transformers import AutoTokenizer

from caictl.stages import inspect as inspection

FAMILIES = ("qwen2.5", "llama3", "phi3", "tiny")


@pytest.fixture(scope="module")
def model(family_model, tiny_model):
    return lambda name: tiny_model if name == "tiny" else family_model(name)


def views(capsys, **options) -> list[dict]:
    inspection.run(inspection.InspectConfig(json=True, **options))
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("stage", ["revise", "sample"])
@pytest.mark.parametrize("name", FAMILIES)
def test_revise_and_sample_show_the_chat_template_s_tokens(name, stage, model, capsys, tmp_path):
    prompts = read_jsonl(EXAMPLES / "red-team.jsonl")[:3]
    shown = views(capsys, file=str(write_jsonl(tmp_path / "p.jsonl", prompts)), model=str(model(name)), stage=stage,
                  limit=2)
    tokenizer = AutoTokenizer.from_pretrained(model(name))
    assert len(shown) == 2
    for view, prompt in zip(shown, prompts):
        expected = tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
        assert view["ids"] == expected
        assert view["tokens"] == tokenizer.convert_ids_to_tokens(expected)
        assert view["text"] == tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True,
                                                             tokenize=False)


@pytest.mark.parametrize("name", FAMILIES)
def test_label_shows_the_choice_tokens_and_where_they_are_read(name, model, capsys, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": "q1", "messages": [{"role": "user", "content": "How do I pick a lock?"}],
         "responses": ["I can't help with that.", "Call a locksmith; they can open it legally."]}])
    (view,) = views(capsys, file=str(pairs), model=str(model(name)), stage="label")
    tokenizer = AutoTokenizer.from_pretrained(model(name))
    assert "How do I pick a lock?" in view["text"] and view["position"] == len(view["ids"]) - 1
    assert view["text"].rstrip(" (").endswith("The answer is:")  # " (" is in the ids where it is a token apart
    # Reading the choice's token at the end of the shown ids is reading the whole " (A" after the question.
    for letter, choice_id in zip("AB", view["choice_ids"]):
        question = view["text"][:view["text"].rindex("The answer is:") + len("The answer is:")]
        direct = tokenizer(question + f" ({letter}", add_special_tokens=False).input_ids
        assert view["ids"] + [choice_id] == direct
    assert view["choice_tokens"] == tokenizer.convert_ids_to_tokens(view["choice_ids"])


@pytest.mark.parametrize("name", ["qwen2.5", "llama3", "phi3"])
def test_sft_shows_the_loss_mask(name, model, capsys, tmp_path):
    revisions = write_jsonl(tmp_path / "rev.jsonl", [
        {"id": "r1", "messages": [{"role": "user", "content": "Is bleach with ammonia safe?"}],
         "initial_response": "Sure.", "steps": [{"revision": "No: the fumes are toxic.", "flags": []}],
         "response": "No: the fumes are toxic."}])
    (view,) = views(capsys, file=str(revisions), model=str(model(name)), stage="sft")
    tokenizer = AutoTokenizer.from_pretrained(model(name))
    assert view["text"] == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is bleach with ammonia safe?"},
         {"role": "assistant", "content": "No: the fumes are toxic."}], tokenize=False)
    trained = [i for i, m in zip(view["ids"], view["mask"]) if m]
    assert tokenizer.decode(trained) == "No: the fumes are toxic." + tokenizer.eos_token
    assert view["ids"] == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is bleach with ammonia safe?"},
         {"role": "assistant", "content": "No: the fumes are toxic."}], tokenize=True, return_dict=True)["input_ids"]


def test_the_command_line_view_and_its_errors(tiny_model, tmp_path):
    revisions = write_jsonl(tmp_path / "rev.jsonl", [
        {"id": "r1", "messages": [{"role": "user", "content": "Hi"}], "initial_response": "a",
         "steps": [{"revision": "Hello there.", "flags": []}], "response": "Hello there."}])
    shown = caictl("inspect", revisions, "--model", tiny_model, "--stage", "sft").stdout
    assert shown.startswith("--- row 1:") and "trained:" in shown and "(in brackets: not trained)" in shown
    bad = caictl("inspect", revisions, "--model", tiny_model, "--stage", "ppo", check=False)
    assert bad.returncode == 2 and "--stage ppo: choose one of revise, sample, label, sft" in bad.stderr
