"""The random-weight models `caictl init-model` builds: presets, caictl's own tokenizer, and the families' shapes.

No weights can be downloaded on an offline machine, so caictl builds its own: a Llama-shaped model with
random weights and a byte-level BPE tokenizer trained on caictl's own constitution text. The chat template is
ChatML with `{% generation %}` markers, so TRL's assistant-only loss works on it.

A Llama config, not Qwen2: transformers 5 rebuilds a Qwen2 tokenizer's pre-tokenizer on reload, which
changes the ids of a BPE trained with a plain byte-level pre-tokenizer.

A family model (qwen2.5, llama3, phi3) is that family's architecture class and config features (Qwen2's q/k/v
biases and tied embeddings, Llama 3's llama3 RoPE scaling and untied head, Phi-3's fused qkv_proj and
gate_up_proj), scaled down but with the full vocabulary, with the family's real tokenizer and TRL's copy of its
chat template (caictl.models.families).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from caictl.models import families

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML. Assistant content and its end marker sit inside the generation block: those are the tokens an
# assistant-only loss trains on.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endif %}"
    "{{- '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Preset:
    vocab_size: int  # BPE target; the model's vocabulary is rounded up to a multiple of 64
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    model_vocab_size: int | None = None  # a real model's embedding size, when the shape should match one


PRESETS = {
    # ~0.2M parameters: unit and stage tests.
    "tiny": Preset(1024, 64, 128, 2, 4, 2, 4096),
    # ~25M parameters: benchmarks and the offline demo.
    "small": Preset(8192, 512, 2048, 6, 8, 2, 4096),
    # Qwen2.5-0.5B's shape (~494M parameters, 151936-token embedding): GPU benchmarks.
    "qwen0.5b-shape": Preset(8192, 896, 4864, 24, 14, 2, 32768, model_vocab_size=151936),
}


@dataclass(frozen=True)
class FamilyPreset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # grouped-query families; the others keep one key/value head per query head


# A family keeps its whole vocabulary, so the embedding holds most of the parameters: tiny is 4-17M
# parameters (phi3 .. llama3, whose head is untied), small 20-70M.
FAMILY_PRESETS = {
    "tiny": FamilyPreset(64, 128, 2, 4, 2),
    "small": FamilyPreset(256, 768, 4, 4, 2),
}

TASKS = ("causal-lm", "seq-cls")


def build_own(preset_name: str, task: str, seed: int):
    """A Llama-shaped model of a preset with caictl's own tokenizer: (model, tokenizer, caictl.json extras)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from caictl.ui import quiet_transformers

    quiet_transformers()
    preset = PRESETS[preset_name]
    tokenizer = build_tokenizer(preset.vocab_size)
    vocab = preset.model_vocab_size or -(-len(tokenizer) // 64) * 64
    model_config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        max_position_embeddings=preset.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        num_labels=1,
    )
    torch.manual_seed(seed)
    model_class = LlamaForCausalLM if task == "causal-lm" else LlamaForSequenceClassification
    model = model_class(model_config)
    if task == "causal-lm":
        model.generation_config.eos_token_id = model_config.eos_token_id
        model.generation_config.pad_token_id = model_config.pad_token_id
        model.generation_config.bos_token_id = None
    return model, tokenizer, {}


def build_family(family_name: str, preset_name: str, task: str, seed: int):
    """A model in a real family's architecture, with its real tokenizer and chat template: (model, tokenizer,
    caictl.json extras saying which family and where the tokenizer and template came from)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from caictl.ui import quiet_transformers

    quiet_transformers()
    family = families.get(family_name)
    shape = FAMILY_PRESETS[preset_name]
    tokenizer = families.load_tokenizer(family.name)
    token_id = tokenizer.convert_tokens_to_ids
    model_config = AutoConfig.for_model(
        family.model_type,
        vocab_size=max(family.vocab_size, len(tokenizer)),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads if family.grouped_query else shape.num_attention_heads,
        bos_token_id=token_id(family.bos) if family.bos else None,
        eos_token_id=token_id(family.eos),
        pad_token_id=token_id(family.pad),
        num_labels=1,
        **family.config,
    )
    torch.manual_seed(seed)
    model_class = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    model = model_class.from_config(model_config)
    if task == "causal-lm":
        model.generation_config.eos_token_id = families.stop_ids(tokenizer, family.name)
        model.generation_config.pad_token_id = model_config.pad_token_id
        model.generation_config.bos_token_id = model_config.bos_token_id
    info = {"family": family.name, "shape_of": family.shape_of, "architecture": type(model).__name__,
            **families.provenance(family.name)}
    return model, tokenizer, info


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained on caictl's own text; deterministic for a given caictl version."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(training_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    return tokenizer


def training_corpus() -> list[str]:
    """Lines of English from the shipped harmless constitution: enough for a small BPE, and always on disk. That file
    alone, so that shipping another constitution does not change the offline models' vocabulary."""
    path = Path(__file__).parents[1] / "constitutions" / "harmless.yaml"
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines += [
        "Human: Assistant: Critique: Revision: The answer is: (A) (B)",
        "0 1 2 3 4 5 6 7 8 9 10 100 1000 { } [ ] ( ) < > = + - * / % # @ ! ? . , ; : ' \"",
    ]
    return lines
