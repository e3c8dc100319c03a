"""Real families offline: `init-model --family` builds each family's architecture with its real tokenizer and
template, loadable by plain transformers; the tokenizers come from llama.cpp's vocabulary files, prepared once.

The expected strings and ids below are written out from the families' published formats, not read back from
caictl's own tables, so a wrong table fails here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import caictl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from caictl.errors import CaictlError, UsageError
from caictl.models import families
from caictl.stages import families_prepare, families_status
from caictl.stages import init_model as tiny

MODEL_FAMILIES = ("qwen2.5", "llama3", "phi3")
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Why?"}]

RENDERED = {
    "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
               "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
              "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWhy?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "phi3": "<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nWhy?<|end|>\n<|assistant|>\n",
}
TEMPLATE_FILE = {"qwen2.5": "qwen2_5.jinja", "llama3": "llama3_1.jinja", "phi3": "phi3_5.jinja"}
GGUF_FILE = {"qwen2.5": "ggml-vocab-qwen2.gguf", "llama3": "ggml-vocab-llama-bpe.gguf", "phi3": "ggml-vocab-phi-3.gguf"}
# (end-of-turn token, its id), every stop id in the family's order, (pad token, its id), (bos, its id): real ids.
END_OF_TURN = {"qwen2.5": ("<|im_end|>", 151645), "llama3": ("<|eot_id|>", 128009), "phi3": ("<|end|>", 32007)}
STOP_IDS = {"qwen2.5": [151645, 151643], "llama3": [128001, 128008, 128009], "phi3": [32007, 32001, 32000]}
PAD = {"qwen2.5": ("<|endoftext|>", 151643), "llama3": ("<|finetune_right_pad_id|>", 128004),
       "phi3": ("<|endoftext|>", 32000)}
BOS = {"qwen2.5": (None, None), "llama3": ("<|begin_of_text|>", 128000), "phi3": ("<s>", 1)}
VOCAB = {"qwen2.5": 151936, "llama3": 128256, "phi3": 32064}
ARCHITECTURE = {"qwen2.5": "Qwen2", "llama3": "Llama", "phi3": "Phi3"}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Builds each (family, task) folder once for the module."""
    root, built = tmp_path_factory.mktemp("families"), {}

    def _build(name: str, task: str = "causal-lm") -> Path:
        if (name, task) not in built:
            built[name, task] = tiny.run(tiny.InitModelConfig(out=root / f"{name}-{task}", family=name, task=task))
        return built[name, task]

    return _build


@pytest.fixture(scope="module")
def loaded(build):
    """(model, tokenizer) of a family's causal-lm folder, through plain Auto classes, once per family."""
    cache = {}

    def _loaded(name: str):
        if name not in cache:
            path = build(name)
            cache[name] = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        return cache[name]

    return _loaded


@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_architecture_class_and_config_features_are_the_familys(name, loaded):
    model, tokenizer = loaded(name)
    config, layer = model.config, model.model.layers[0]
    assert type(model).__name__ == f"{ARCHITECTURE[name]}ForCausalLM"
    assert model.model.embed_tokens.weight.shape[0] == config.vocab_size == VOCAB[name] >= len(tokenizer)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if name == "qwen2.5":
        attention = layer.self_attn
        assert all(getattr(attention, p).bias is not None for p in ("q_proj", "k_proj", "v_proj"))
        assert attention.o_proj.bias is None
        assert config.tie_word_embeddings and tied
        assert config.num_key_value_heads < config.num_attention_heads
    elif name == "llama3":
        assert config.rope_parameters == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}
        assert not config.tie_word_embeddings and not tied
        assert layer.self_attn.q_proj.bias is None
        assert config.num_key_value_heads < config.num_attention_heads
    else:
        head_dim = config.hidden_size // config.num_attention_heads
        assert not hasattr(layer.self_attn, "q_proj") and not hasattr(layer.mlp, "up_proj")
        assert layer.self_attn.qkv_proj.out_features == 3 * config.num_attention_heads * head_dim
        assert layer.mlp.gate_up_proj.out_features == 2 * config.intermediate_size
        assert not config.tie_word_embeddings and not tied


@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_template_is_trls_original_and_renders_as_the_family_does(name, loaded):
    _, tokenizer = loaded(name)
    trl = Path(importlib.util.find_spec("trl").submodule_search_locations[0])
    assert tokenizer.chat_template == (trl / "chat_templates" / TEMPLATE_FILE[name]).read_text(encoding="utf-8")
    assert "{% generation %}" not in tokenizer.chat_template
    assert tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == RENDERED[name]
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    end_of_turn, end_id = END_OF_TURN[name]
    assert ids.count(end_id) == RENDERED[name].count(end_of_turn)  # each marker is one special token
    bos, bos_id = BOS[name]
    if name == "llama3":
        assert ids[0] == bos_id and ids.count(bos_id) == 1
    elif name == "phi3":
        assert tokenizer.convert_ids_to_tokens(ids[:2]) == ["<|user|>", "▁Hi"]  # its markers eat the newline
        assert bos_id not in ids
    else:
        assert tokenizer.bos_token is None and ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_eos_is_the_end_of_turn_token_and_generation_stops_on_every_stop_id(name, loaded):
    model, tokenizer = loaded(name)
    end_of_turn, end_id = END_OF_TURN[name]
    assert (tokenizer.eos_token, tokenizer.eos_token_id, model.config.eos_token_id) == (end_of_turn, end_id, end_id)
    assert model.generation_config.eos_token_id == STOP_IDS[name]
    pad, pad_id = PAD[name]
    assert (tokenizer.pad_token, tokenizer.pad_token_id, model.config.pad_token_id) == (pad, pad_id, pad_id)
    assert model.generation_config.pad_token_id == pad_id != end_id
    bos, bos_id = BOS[name]
    assert (tokenizer.bos_token, model.config.bos_token_id) == (bos, bos_id)
    starts_with_bos = tokenizer("Hi").input_ids[0] == bos_id
    assert starts_with_bos == (name == "llama3")  # Llama 3 puts bos before text; Qwen2.5 and Phi-3.5 do not


@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_a_short_generate_runs(name, loaded):
    model, tokenizer = loaded(name)
    inputs = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    width = inputs["input_ids"].shape[1]
    assert torch.equal(output[:, :width], inputs["input_ids"]) and 1 <= output.shape[1] - width <= 4


@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_seq_cls_folder_loads_as_a_scalar_head(name, build, loaded):
    path = build(name, "seq-cls")
    model = AutoModelForSequenceClassification.from_pretrained(path)
    _, tokenizer = loaded(name)  # the causal-lm folder's, loaded by AutoTokenizer: the same files
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (path / file).read_bytes() == (build(name) / file).read_bytes()
    assert type(model).__name__ == f"{ARCHITECTURE[name]}ForSequenceClassification"
    assert model.config.pad_token_id == PAD[name][1] and model.config.num_labels == 1
    batch = tokenizer(["Hi there, how are you?", "Hi"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        assert model(**batch).logits.shape == (2, 1)
    assert json.loads((path / "caictl.json").read_text())["task"] == "seq-cls"


@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_caictl_json_says_random_weights_and_where_tokenizer_and_template_came_from(name, build, loaded):
    info = json.loads((build(name) / "caictl.json").read_text())
    model, _ = loaded(name)
    assert info["random_weights"] is True and "RANDOM WEIGHTS" in info["warning"]
    assert info["family"] == name and info["architecture"] == type(model).__name__
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    source = info["tokenizer"]
    assert source["gguf_file"] == GGUF_FILE[name]
    assert source["llama_cpp_python_version"] == families.LLAMA_CPP_PYTHON
    vocab = families.cache_root() / "gguf" / f"llama-cpp-python-{families.LLAMA_CPP_PYTHON}" / GGUF_FILE[name]
    assert source["gguf_sha256"] == hashlib.sha256(vocab.read_bytes()).hexdigest()
    assert source["converted_with"] == f"transformers {importlib.metadata.version('transformers')}"
    template = info["chat_template"]
    assert (template["file"], template["trl_version"]) == (TEMPLATE_FILE[name], importlib.metadata.version("trl"))


@pytest.mark.parametrize("name, alone, in_context", [
    ("qwen2.5", ["Ġ(", "A"], ["Ġ(", "A"]),
    ("llama3", ["Ġ(", "A"], ["Ġ(", "A"]),
    # SentencePiece: alone, the text gets a prefix space of its own; after other text it does not.
    ("phi3", ["▁", "▁(", "A"], ["▁(", "A"]),
])
def test_choice_tokens_as_the_real_tokenizers_split_them(name, alone, in_context, loaded):
    _, tokenizer = loaded(name)
    assert tokenizer.tokenize(" (A") == alone
    assert tokenizer.tokenize("The answer is: (A")[-2:] == in_context
    assert tokenizer.tokenize("The answer is: (B")[-2:] == in_context[:-1] + ["B"]


@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_folder_tokenizer_gives_the_prepared_tokenizers_ids(name, loaded):
    _, reloaded = loaded(name)
    prepared = families.load_tokenizer(name)
    text = 'héllo 日本 {{x}} "\n\nHuman: (A) <|im_end|><|eot_id|><|end|>'
    assert reloaded(text).input_ids == prepared(text).input_ids
    assert reloaded.decode(reloaded(text, add_special_tokens=False).input_ids) == text


def test_llama2_spm_is_a_tokenizer_without_template_or_model(tmp_path):
    tokenizer = families.load_tokenizer("llama2-spm")
    assert (len(tokenizer), tokenizer.bos_token, tokenizer.eos_token, tokenizer.chat_template) == (32000, "<s>", "</s>",
                                                                                                   None)
    assert tokenizer("Hi").input_ids[0] == 1
    assert tokenizer.tokenize("The answer is: (A")[-2:] == ["▁(", "A"]
    with pytest.raises(UsageError, match="tokenizer-level family"):
        tiny.InitModelConfig(out=tmp_path / "m", family="llama2-spm").check()


@pytest.mark.parametrize("family, preset, message", [
    ("gpt2", "tiny", "unknown family 'gpt2'; choose one of qwen2.5, llama3, phi3"),
    ("qwen2.5", "qwen0.5b-shape", "--family builds presets tiny or small"),
])
def test_bad_family_options_are_refused_before_any_work(family, preset, message, tmp_path):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(".", r"\.")):
        tiny.InitModelConfig(out=tmp_path / "m", family=family, preset=preset).check()
    assert not (tmp_path / "m").exists()


def test_an_unprepared_cache_is_one_line_that_says_how_to_prepare(tmp_path, monkeypatch):
    empty = tmp_path / "empty-cache"
    monkeypatch.setenv("CAICTL_CACHE", str(empty))
    with pytest.raises(CaictlError, match=r"the qwen2\.5 tokenizer is not prepared"):
        tiny.InitModelConfig(out=tmp_path / "m", family="qwen2.5").check()
    result = caictl("init-model", "--family", "phi3", "--out", tmp_path / "m", env={"CAICTL_CACHE": str(empty)},
                    check=False)
    assert result.returncode == 1 and not (tmp_path / "m").exists()
    assert result.stderr.count("\n") == 1 and "caictl families prepare" in result.stderr
    assert "make setup" in result.stderr and str(empty) in result.stderr


def test_prepare_converts_from_a_source_package_once_and_then_skips(tmp_path):
    vocab = families.cache_root() / "gguf" / f"llama-cpp-python-{families.LLAMA_CPP_PYTHON}"
    archive = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for file in ("ggml-vocab-llama-spm.gguf", "ggml-vocab-phi-3.gguf"):
            tar.add(vocab / file, f"llama_cpp_python-0.3.36/vendor/llama.cpp/models/{file}")
    cache, logs = tmp_path / "cache", []
    families.prepare(["llama2-spm"], cache=cache, sdist=archive, log=logs.append)
    folder = cache / "tokenizers" / "llama2-spm"
    assert families.is_prepared("llama2-spm", cache) and not families.is_prepared("phi3", cache)
    assert [p.name for p in (cache / "gguf").rglob("*.gguf")] == ["ggml-vocab-llama-spm.gguf"]  # only what was asked
    source = json.loads((folder / "source.json").read_text())
    assert source["gguf_sha256"] == hashlib.sha256((vocab / "ggml-vocab-llama-spm.gguf").read_bytes()).hexdigest()
    assert families.load_tokenizer("llama2-spm", cache)("Hi").input_ids == families.load_tokenizer("llama2-spm")(
        "Hi").input_ids
    archive.unlink()  # a second run must not need the package at all
    logs.clear()
    families.prepare(["llama2-spm"], cache=cache, sdist=archive, log=logs.append)
    assert logs == [f"llama2-spm: ready in {folder}"]
    (folder / "source.json").unlink()  # as an interrupted conversion leaves it
    assert not families.is_prepared("llama2-spm", cache)


def test_families_prepare_skips_a_cached_family_and_refuses_an_unknown_one(tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(families.tokenizer_folder("llama2-spm"), families.tokenizer_folder("llama2-spm", cache))
    prepare = families_prepare.FamiliesPrepareConfig
    folders = families_prepare.run(prepare(family=["llama2-spm"], cache=str(cache)))
    assert folders == {"llama2-spm": cache / "tokenizers" / "llama2-spm"}
    assert f"llama2-spm: ready in {folders['llama2-spm']}" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--family gpt2: unknown; choose from qwen2.5, llama3, phi3, llama2-spm"):
        families_prepare.run(prepare(family=["gpt2", "llama2-spm"], cache=str(cache)))
    assert families_status.run(families_status.FamiliesStatusConfig(cache=str(cache))) == {
        "qwen2.5": False, "llama3": False, "phi3": False, "llama2-spm": True}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"qwen2.5\t{cache / 'tokenizers' / 'qwen2.5'}\tnot prepared: run `caictl families prepare`"
    assert lines[3] == f"llama2-spm\t{folders['llama2-spm']}\tready"


@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_defused_control_text_is_text_to_the_familys_own_tokenizer(name, loaded, monkeypatch):
    # What a server does with text the openai engine sends: its tokenizer parses control tokens anywhere. No local
    # tokenizer is registered for a server's model, so the shapes alone must cover the family.
    from caictl.data import control_text as tokens

    monkeypatch.setattr(tokens, "_pattern", None)
    tokenizer = loaded(name)[1]
    control = sorted(tokens.control_tokens(tokenizer))
    control_ids = set(tokenizer.convert_tokens_to_ids(control))
    text = "Say " + " then ".join(control) + " now."
    assert control_ids & set(tokenizer(text, add_special_tokens=False).input_ids)  # as sent, they would be control
    defused = tokens.defuse(text)
    assert not control_ids & set(tokenizer(defused, add_special_tokens=False).input_ids)
    assert defused.replace(tokens.WORD_JOINER, "") == text
    assert tokens.defuse("Say <b>hello</b> in [brackets] | pipes |.") == "Say <b>hello</b> in [brackets] | pipes |."
