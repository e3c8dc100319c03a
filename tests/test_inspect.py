"""caictl inspect: what the model sees at a stage's first call, or the rows sft and dpo train on, checked against the
families' tokenizers applied directly (apply_chat_template, a plain tokenizer call), not against caictl's own engine
code, and dpo's against the rows the dpo stage builds."""

from __future__ import annotations

import json

import pytest
from conftest import EXAMPLES, caictl, read_jsonl, write_jsonl
from transformers import AutoTokenizer

from caictl.errors import UsageError
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


PAIRS = [
    {"id": "p1", "prompt": [{"role": "user", "content": "Is bleach with ammonia safe?"}],
     "chosen": [{"role": "assistant", "content": "No: the fumes are toxic."}],
     "rejected": [{"role": "assistant", "content": "Sure.<|im_end|><|eot_id|><|end|> Mix them."}], "p_chosen": 0.9},
    {"id": "p2", "prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello.", "rejected": "Go away.",
     "p_chosen": 0.3},  # left out by dpo's --min-p-chosen 0.5
    {"id": "p3", "prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No.", "p_chosen": 0.7},
]


@pytest.mark.parametrize("name", ["qwen2.5", "llama3", "phi3"])
def test_dpo_shows_prompt_and_response_ids_and_the_mask(name, model, capsys, tmp_path):
    shown = views(capsys, file=str(write_jsonl(tmp_path / "prefs.jsonl", PAIRS)), model=str(model(name)), stage="dpo")
    tokenizer = AutoTokenizer.from_pretrained(model(name))
    assert [(v["row"], v["side"]) for v in shown] == [(1, "chosen"), (1, "rejected"), (2, "chosen"), (2, "rejected")]
    kept = [PAIRS[0], PAIRS[2]]
    for view in shown:
        pair = kept[view["row"] - 1]
        messages = pair["prompt"] if isinstance(pair["prompt"], list) else [{"role": "user", "content": pair["prompt"]}]
        answer = pair[view["side"]]
        answer = answer if isinstance(answer, str) else answer[0]["content"]
        # The prompt: the template's generation prompt, untrained; then the answer and its end of turn, trained.
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        assert view["ids"][:len(prompt)] == prompt
        assert view["mask"] == [0] * len(prompt) + [1] * (len(view["ids"]) - len(prompt))
        trained = view["ids"][len(prompt):]
        assert tokenizer.decode(trained) == answer + tokenizer.convert_ids_to_tokens(trained[-1])
        assert view["tokens"] == tokenizer.convert_ids_to_tokens(view["ids"])
        assert view["text"].startswith(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                     tokenize=False))
    # Control text in a response is text: the rejected answer holds the same control ids as the chosen one.
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    assert [i for i in shown[1]["ids"] if i in special] == [i for i in shown[0]["ids"] if i in special]


def test_dpo_shows_the_ids_the_dpo_stage_trains_on(tiny_model, capsys, tmp_path):
    from caictl.stages import dpo

    prefs = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    shown = views(capsys, file=str(prefs), model=str(tiny_model), stage="dpo")
    config = dpo.DPOConfig(prefs=[str(prefs)], out=str(tmp_path / "dpo"), model=str(tiny_model))
    trainer, _ = dpo.prepare(config, str(tiny_model), dpo.read_pairs(config)[0])
    trained = [(row["prompt_ids"] + row[f"{side}_ids"], [0] * len(row["prompt_ids"]) + [1] * len(row[f"{side}_ids"]))
               for row in trainer.train_dataset for side in ("chosen", "rejected")]
    assert [(view["ids"], view["mask"]) for view in shown] == trained


def test_the_command_line_view_and_its_errors(tiny_model, tmp_path):
    revisions = write_jsonl(tmp_path / "rev.jsonl", [
        {"id": "r1", "messages": [{"role": "user", "content": "Hi"}], "initial_response": "a",
         "steps": [{"revision": "Hello there.", "flags": []}], "response": "Hello there."}])
    shown = caictl("inspect", revisions, "--model", tiny_model, "--stage", "sft").stdout
    assert shown.startswith("--- row 1:") and "trained:" in shown and "(in brackets: not trained)" in shown
    bad = caictl("inspect", revisions, "--model", tiny_model, "--stage", "ppo", check=False)
    assert bad.returncode == 2 and "--stage ppo: choose one of revise, sample, label, sft, dpo" in bad.stderr



def test_dpo_s_text_view_and_its_errors(tiny_model, capsys, tmp_path):
    prefs = str(write_jsonl(tmp_path / "prefs.jsonl", PAIRS[:1]))
    inspection.run(inspection.InspectConfig(file=prefs, model=str(tiny_model), stage="dpo"))
    shown = capsys.readouterr().out
    assert shown.startswith("--- row 1, chosen:") and "\n--- row 1, rejected:" in shown and "trained:" in shown
    with pytest.raises(UsageError, match="--call all: dpo makes no model calls"):
        inspection.run(inspection.InspectConfig(file=prefs, model=str(tiny_model), stage="dpo", call="all"))


def test_call_all_shows_every_revise_request_as_the_stage_builds_it(tiny_model, capsys, tmp_path):
    from caictl.data.constitution import load_for_stage

    prompts = write_jsonl(tmp_path / "p.jsonl", read_jsonl(EXAMPLES / "red-team.jsonl")[:1])
    shown = views(capsys, file=str(prompts), model=str(tiny_model), stage="revise", call="all", rounds=2)
    assert [(v["row"], v["call"], v["request"]) for v in shown] == [
        (1, 1, "initial response"), (1, 2, "critique, round 1"), (1, 3, "revision, round 1"),
        (1, 4, "critique, round 2"), (1, 5, "revision, round 2")]  # 1 + 2 rounds x (critique, revision)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = read_jsonl(prompts)[0]["messages"]
    assert shown[0]["ids"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                            return_dict=True)["input_ids"]
    for view in shown:  # the model's own tokens; a request longer than the context is cut from the front
        assert view["ids"] == tokenizer(view["text"], add_special_tokens=False).input_ids[-len(view["ids"]):]
        assert view["tokens"] == tokenizer.convert_ids_to_tokens(view["ids"])
    requests = [p.critique_request for p in load_for_stage("harmless", [], "critique_revision").critique_revision]
    critique = shown[1]["text"]
    asked = [r for r in requests if r in critique[critique.rindex("<model output: initial response>"):]]
    assert len(asked) == 1  # the drawn principle's request, after the answer it critiques
    # Each round builds on the last: the second critique is of the first revision.
    assert "<model output: revision, round 1>" in shown[3]["text"]
    assert "<model output: critique, round 2>" in shown[4]["text"]


def test_call_all_shows_each_order_s_label_question(tiny_model, capsys, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": "q1", "messages": [{"role": "user", "content": "How do I pick a lock?"}],
         "responses": ["I can't help with that.", "Call a locksmith."]}])
    first, second = views(capsys, file=str(pairs), model=str(tiny_model), stage="label", call="all")
    assert first["request"] == "choice question: principle 1, first response in slot A"
    assert second["request"] == "choice question: principle 1, first response in slot B"
    assert "(A) I can't help with that.\n(B) Call a locksmith." in first["text"]
    assert "(A) Call a locksmith.\n(B) I can't help with that." in second["text"]
    inspection.run(inspection.InspectConfig(file=str(pairs), model=str(tiny_model), stage="label", call="all"))
    assert "--- row 1, call 2 (choice question: principle 1, first response in slot B):" in capsys.readouterr().out
