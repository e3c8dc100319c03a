"""The offline models: deterministic, small, honest about their weights, usable by transformers and TRL."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from caictl.errors import UsageError
from caictl.models import builders
from caictl.stages import init_model as tiny


def _state(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_model):
    again = tiny.run(tiny.InitModelConfig(out=tmp_path / "again", preset="tiny", seed=0))
    other = tiny.run(tiny.InitModelConfig(out=tmp_path / "other", preset="tiny", seed=1))
    a, b, c = _state(tiny_model), _state(again), _state(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (tiny_model / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_tiny_is_well_under_a_million_parameters_and_says_its_weights_are_random(tiny_model):
    info = json.loads((tiny_model / "caictl.json").read_text())
    assert info["random_weights"] is True and "RANDOM WEIGHTS" in info["warning"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert info["parameters"] == sum(p.numel() for p in model.parameters()) < 500_000


def test_tokenizer_reloads_with_the_same_ids_and_round_trips_text(tiny_model):
    reloaded = AutoTokenizer.from_pretrained(tiny_model)
    built = builders.build_tokenizer(builders.PRESETS["tiny"].vocab_size)
    text = 'Literal {{x}} {% raw %} "\n\nHuman: héllo 日本 <b>'
    assert reloaded(text).input_ids == built(text).input_ids
    assert reloaded.decode(reloaded(text).input_ids) == text


def test_chat_template_marks_exactly_the_assistant_text(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    chat = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello friend"}]
    out = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(marked) == "hello friend<|im_end|>"


def test_seq_cls_variant_loads_as_a_scalar_head(tmp_path):
    path = tiny.run(tiny.InitModelConfig(out=tmp_path / "pm", preset="tiny", task="seq-cls"))
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["a b c", "a"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 1)


def test_unknown_preset_is_refused_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="unknown preset 'huge'"):
        tiny.run(tiny.InitModelConfig(out=tmp_path / "x", preset="huge"))
    assert not (tmp_path / "x").exists()
