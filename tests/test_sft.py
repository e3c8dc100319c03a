"""caictl sft on the tiny model: the loss falls, outputs reload, LoRA merges exactly, the mask is exact."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import caictl, caictl_in_process, read_jsonl, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from caictl.data.records import Row
from caictl.errors import UsageError
from caictl.models import chat_training
from caictl.stages import sft

ANSWERS = ["I can't help with hurting anyone, but if you're in danger, call emergency services.",
           "Lock picking is legal on locks you own; practice locks and a beginner kit are a good start.",
           "Please don't mix bleach and ammonia: the fumes are toxic. Open a window and use one cleaner at a time."]


def revision_records(count: int) -> list[dict]:
    rows = []
    for i in range(count):
        answer = ANSWERS[i % len(ANSWERS)]
        rows.append({
            "id": f"r{i}", "messages": [{"role": "user", "content": f"Question number {i}?"}],
            "initial_response": "Sure, here is how.",
            "steps": [{"round": 1, "principle": "harm", "revision": "Draft: " + answer, "flags": []},
                      {"round": 2, "principle": "harm", "revision": "", "flags": ["empty_revision"]},
                      {"round": 3, "principle": "harm", "revision": answer, "flags": []}],
            "response": answer, "flags": ["empty_revision"], "meta": {"stage": "revise"},
        })
    return rows


@pytest.fixture(scope="module")
def revisions(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft") / "revisions.jsonl", revision_records(24))


FAST = ["--epochs", "4", "--learning-rate", "3e-3", "--batch-size", "8", "--max-length", "128"]


@pytest.mark.slow
def test_full_fine_tuning_lowers_the_loss_and_reloads(tmp_path, tiny_model, revisions):
    out = tmp_path / "sl-cai"
    caictl_in_process("sft", revisions, "-o", out, "--model", tiny_model, *FAST)
    info = json.loads((out / "caictl.json").read_text())
    history = [h["loss"] for h in info["metrics"]["loss_history"]]
    assert len(history) == info["metrics"]["steps"] == 12
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3 - 0.5
    assert info["inputs"][0]["sha256"] and info["base_model"] == str(tiny_model)
    assert info["metrics"]["examples_per_source"] == {"revisions": 24}
    assert (out / "loss.png").stat().st_size > 1000
    assert not (out / "checkpoints").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    again = caictl("sft", revisions, "-o", out, "--model", tiny_model, *FAST, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.slow
def test_lora_merged_model_equals_base_plus_adapter(tmp_path, tiny_model, revisions):
    from peft import PeftModel

    out = tmp_path / "lora"
    caictl_in_process("sft", revisions, "-o", out, "--model", tiny_model, "--lora", "--merge", "--lora-r", "4", *FAST)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out / "adapter").eval()
    adapter_alone = AutoModelForCausalLM.from_pretrained(out / "adapter").eval()  # plain transformers, via peft
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = AutoTokenizer.from_pretrained(out)(["Question number 3? Lock picking"], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = [m(ids).logits for m in (merged, with_adapter, adapter_alone, base)]
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    assert torch.allclose(logits[0], logits[2], atol=1e-5)
    assert not torch.allclose(logits[0], logits[3], atol=1e-3)  # the adapter did learn something


def test_the_loss_mask_covers_exactly_the_assistant_text(tmp_path, tiny_model, revisions):
    config = sft.SFTConfig(revisions=[str(revisions)], out=str(tmp_path / "x"), model=str(tiny_model))
    conversation = [{"role": "user", "content": "Is it safe?"}, {"role": "assistant", "content": ANSWERS[2]}]
    trainer, tokenizer, truncated, template = sft.prepare(config, str(tiny_model), [conversation])
    batch = trainer.data_collator([trainer.train_dataset[0]])
    trained = batch["input_ids"][0][batch["labels"][0] != -100]
    assert tokenizer.decode(trained) == ANSWERS[2] + "<|im_end|>"
    assert truncated == 0
    assert template["training"]["source"] == "model"  # caictl's tiny template has the markers itself


# Token ids for the hand-worked masks below: 90 <|im_start|>, 91 <|im_end|>, 92 <|python_tag|>, 80 <|assistant|>,
# 81 <|end|> are special; 7 "assistant", 10 "\n" and 11 a lone SentencePiece "▁" are blank or plain; 20-43 words.
MARKUP = {80, 81, 90, 91, 92}


def labels_of(ids, mask, header):
    return chat_training.assistant_labels(ids, mask, MARKUP, header, lambda i: i in {10, 11})


def trained(ids, labels):
    assert all(label in (-100, i) for i, label in zip(ids, labels))
    return [label for label in labels if label != -100]


def test_assistant_labels_cut_each_span_to_the_answer_and_its_end_of_turn_token():
    qwen = [90, 7, 10]  # <|im_start|>assistant\n: the block of TRL's Qwen2.5 template opens on its newline
    ids = [90, 20, 10, 21, 91, 10, 90, 7, 10, 30, 10, 31, 91, 10, 90, 20, 10, 22, 91, 10, 90, 7, 10, 32, 91, 10]
    mask = [0] * 8 + [1] * 6 + [0] * 8 + [1] * 4
    assert trained(ids, labels_of(ids, mask, qwen)) == [30, 10, 31, 91, 32, 91]  # inner newline kept, outer ones not
    empty = [90, 7, 10, 91, 10]  # an empty answer still trains its end-of-turn token
    assert trained(empty, labels_of(empty, [0, 0, 1, 1, 1], qwen)) == [91]
    # Phi-3.5: eos (<|end|> again) follows the last turn in a block of its own; an answer that starts on
    # whitespace makes <|assistant|> (which swallows it) overlap the block; a lone "▁" opening an answer is content.
    assert trained([80, 40, 41, 81, 81], labels_of([80, 40, 41, 81, 81], [0, 1, 1, 1, 1], [80])) == [40, 41, 81]
    assert trained([80, 40, 81, 81], labels_of([80, 40, 81, 81], [1, 1, 1, 1], [80])) == [40, 81]
    assert trained([80, 11, 42, 81], labels_of([80, 11, 42, 81], [0, 1, 1, 1], [80])) == [11, 42, 81]
    assert trained([80, 81, 81], labels_of([80, 81, 81], [0, 1, 1], [80])) == [81]
    # Llama 3.1's built-in tool call opens on a special token that is not the header's: it is trained.
    call = [90, 7, 91, 10, 92, 43, 20, 91]
    assert trained(call, labels_of(call, [0, 0, 0, 0, 1, 1, 1, 1], [90, 7, 91, 10])) == [92, 43, 20, 91]
    with pytest.raises(ValueError, match="end-of-turn token is outside"):
        labels_of([80, 40, 81], [0, 1, 0], [80])
    with pytest.raises(ValueError, match="mark no assistant token"):
        labels_of([80, 40, 81], [0, 0, 0], [80])


def test_a_template_that_leaves_the_end_of_turn_token_untrained_is_refused(tmp_path, tiny_model):
    template = tmp_path / "open-ended.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                        "{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
                        "<|im_end|>\n{% endfor %}")
    config = sft.SFTConfig(revisions=[], out=str(tmp_path / "x"), model=str(tiny_model), chat_template=str(template))
    with pytest.raises(UsageError, match=r"training example 1: an assistant turn's end-of-turn token is outside .*"
                                         r"pass --chat-template FILE"):
        sft.prepare(config, str(tiny_model), [[{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello."}]])
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for path, problem in ((plain, "no {% generation %} ... {% endgeneration %} markers"),
                          (tmp_path / "missing.jinja", "no such file")):
        with pytest.raises(UsageError, match=re.escape(f"--chat-template {path}: {problem}")):
            sft.SFTConfig(revisions=[str(template)], out=str(tmp_path / "y"), chat_template=str(path)).check()


def test_revisions_all_uses_every_usable_round():
    row = Row("r.jsonl", 1, revision_records(1)[0])
    final = sft.training_conversations(row, "final")
    every = sft.training_conversations(row, "all")
    assert [c[-1]["content"] for c in final] == [ANSWERS[0]]
    assert [c[-1]["content"] for c in every] == ["Draft: " + ANSWERS[0], ANSWERS[0]]  # the empty one is left out


def test_mix_weights_set_each_sources_share(tmp_path):
    revisions = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a{i}"}] for i in range(30)]
    helpful = [[{"role": "user", "content": "h"}, {"role": "assistant", "content": f"h{i}"}] for i in range(100)]
    few = [[{"role": "user", "content": "f"}, {"role": "assistant", "content": "f"}]] * 3
    examples, counts = sft.mix_sources([("revisions", 1.0, revisions), ("helpful", 2.0, helpful),
                                        ("few", 0.5, few)], seed=0)
    # Shares 1 : 2 : 0.5 of a set that keeps every revision: 30, 60 and 15 (the small source is cycled).
    assert counts == {"revisions": 30, "helpful": 60, "few": 15}
    assert len(examples) == 105
    assert len({e[-1]["content"] for e in examples if e[0]["content"] == "h"}) == 60  # drawn without repeats


def test_mix_reads_chat_and_hh_rows_through_the_cli(tmp_path, tiny_model, revisions):
    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": "Boil an egg?"}, {"role": "assistant", "content": "Ten minutes."}]},
        {"prompt": "Capital of France?", "completion": "Paris."},
        {"chosen": "\n\nHuman: Say hi\n\nAssistant: Hi!", "rejected": "\n\nHuman: Say hi\n\nAssistant: No."},
        {"id": "s", "messages": [{"role": "user", "content": "Tea?"}], "responses": ["Yes please.", "No."]},
    ])
    out = tmp_path / "mixed"
    caictl_in_process("sft", revisions, "--mix", f"{chats}:0.5", "-o", out, "--model", tiny_model, "--max-steps", "1")
    counts = json.loads((out / "caictl.json").read_text())["metrics"]["examples_per_source"]
    assert counts == {"revisions": 24, str(chats): 12}
    rows = [sft.chat_conversation(Row("chats.jsonl", i + 1, r)) for i, r in enumerate(read_jsonl(chats))]
    assert [r[-1]["content"] for r in rows] == ["Ten minutes.", "Paris.", "Hi!", "Yes please."]


@pytest.mark.slow
def test_traps_give_clear_errors(tmp_path, tiny_model, revisions):
    plain = tmp_path / "plain-template"
    plain.mkdir()
    for item in tiny_model.iterdir():
        (plain / item.name).symlink_to(item)
    (plain / "chat_template.jinja").unlink()
    (plain / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    result = caictl("sft", revisions, "-o", tmp_path / "a", "--model", plain, check=False)
    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and "no {% generation %} markers, and neither TRL nor caictl" in message
    assert "pass --chat-template FILE" in message

    flagged = write_jsonl(tmp_path / "flagged.jsonl", [
        {**revision_records(1)[0], "steps": [{"revision": "", "flags": ["empty_revision"]}]}])
    result = caictl("sft", flagged, "-o", tmp_path / "b", "--model", tiny_model, "--revisions", "all", check=False)
    assert result.returncode == 2 and "no training examples" in result.stderr

    long = tmp_path / "long"
    result = caictl("sft", revisions, "-o", long, "--model", tiny_model, "--max-length", "20", "--max-steps", "1")
    assert "24 of 24 examples are longer than --max-length 20" in " ".join(result.stderr.split())
    assert json.loads((long / "caictl.json").read_text())["metrics"]["truncated_examples"] == 24

    result = caictl("sft", tmp_path / "missing.jsonl", "-o", tmp_path / "c", "--model", tiny_model, check=False)
    assert result.returncode == 2 and "missing.jsonl: no such file" in result.stderr


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path, tiny_model, revisions):
    out = tmp_path / "resumed"
    config = sft.SFTConfig(revisions=[str(revisions)], out=str(out), model=str(tiny_model), max_steps=2,
                           save_steps=2, batch_size=8, learning_rate=3e-3)
    examples, _ = sft.mix_sources(sft.load_sources(config), seed=0)
    trainer, *_ = sft.prepare(config, str(tiny_model), examples)
    trainer.train()  # stops at step 2 with a checkpoint, as a killed run would have left it
    assert (out / "checkpoints" / "checkpoint-2").exists()
    result = caictl("sft", revisions, "-o", out, "--model", tiny_model, "--max-steps", "4", "--batch-size", "8",
                    "--learning-rate", "3e-3", "--save-steps", "2")
    assert "resuming from" in result.stderr and "checkpoint-2" in result.stderr
    info = json.loads((out / "caictl.json").read_text())
    assert info["metrics"]["steps"] == 4
    assert [h["step"] for h in info["metrics"]["loss_history"]] == [1, 2, 3, 4]


@pytest.mark.slow
def test_micro_batches_make_the_same_step_as_the_whole_batch(tmp_path, tiny_model, revisions):
    losses, weights = [], []
    for micro in ("1", "8"):
        out = tmp_path / f"micro-{micro}"
        caictl_in_process("sft", revisions, "-o", out, "--model", tiny_model, "--max-steps", "1",
                          "--learning-rate", "3e-3", "--batch-size", "8", "--max-length", "128",
                          "--micro-batch-size", micro)
        losses.append(json.loads((out / "caictl.json").read_text())["metrics"]["train_loss_first"])
        weights.append(AutoModelForCausalLM.from_pretrained(out).model.embed_tokens.weight)
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert torch.allclose(weights[0], weights[1], atol=1e-5)
    bad = caictl("sft", revisions, "-o", tmp_path / "bad", "--model", tiny_model, "--batch-size", "8",
                 "--micro-batch-size", "3", check=False)
    assert bad.returncode == 2 and "--micro-batch-size 3 must divide --batch-size 8" in bad.stderr


def test_no_usable_revision_means_nothing_to_train_on():
    record = revision_records(1)[0]
    record["steps"] = [step for step in record["steps"] if step["flags"]]  # only the empty revision is left
    record["response"] = record["initial_response"]  # so revise kept the first answer
    row = Row(source="r.jsonl", line=1, data=record)
    assert sft.training_conversations(row, "final") == [] and sft.training_conversations(row, "all") == []


def test_anthropic_sl_samples_train_on_their_revisions(shared_data):
    rows = read_jsonl(shared_data / "anthropic-samples" / "LAMDA_SLMADISON.first5.jsonl")
    for number, data in enumerate(rows, 1):
        row = Row("sl.jsonl", number, data)
        prompt = [{"role": "user", "content": data["rl_prompt"].split("Human:")[1].split("\n\nAssistant:")[0].strip()}]
        revisions = [step["revision"]["sample"].strip() for step in data["cst"]]
        assert sft.training_conversations(row, "final") == [prompt + [{"role": "assistant", "content": revisions[-1]}]]
        assert sft.training_conversations(row, "all") == [prompt + [{"role": "assistant", "content": revision}]
                                                          for revision in revisions]


def test_hf_rows_train_on_their_revision_and_never_on_the_first_answer():
    question = [{"role": "user", "content": "Question?"}]
    revised = {"id": "a", "init_response": "Sure, here is how.", "revision_response": ANSWERS[0],
               "messages": question + [{"role": "assistant", "content": ANSWERS[0]}]}
    # No usable revision: revise --format hf ends `messages` with the first answer.
    unrevised = {**revised, "messages": question + [{"role": "assistant", "content": "Sure, here is how."}]}
    assert sft.training_conversations(Row("hf.jsonl", 1, revised), "final") == [revised["messages"]]
    assert sft.training_conversations(Row("hf.jsonl", 2, unrevised), "final") == []


def test_chat_rows_and_anthropic_samples_are_main_input(tmp_path, tiny_model, shared_data):
    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": "Boil an egg?"}, {"role": "assistant", "content": "Ten minutes."}]},
        {"prompt": "\n\nHuman: Capital of France?\n\nAssistant:", "completion": " Paris."},
    ])
    sl = shared_data / "anthropic-samples" / "LAMDA_SLMADISON.first5.jsonl"
    out = tmp_path / "sl-cai"
    caictl_in_process("sft", sl, chats, "-o", out, "--model", tiny_model, "--max-steps", "1", "--max-length", "128")
    assert json.loads((out / "caictl.json").read_text())["metrics"]["examples_per_source"] == {"revisions": 7}
    assert [sft.chat_conversation(Row("chats.jsonl", i + 1, r)) for i, r in enumerate(read_jsonl(chats))][1] == [
        {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": "Hi?"}]}])
    result = caictl("sft", prompts, "-o", tmp_path / "b", "--model", tiny_model, check=False)
    assert result.returncode == 2
    assert "prompts.jsonl:1: the conversation must end with an assistant message" in " ".join(result.stderr.split())
