"""benchmarks/gpu.py: its card table, its FLOP count, and its --smoke run on the CPU (which checks the script's own
bookkeeping: equal work on both sides, cold caictl runs, the FLOP count against a hand count)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while the class is made
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def tiny_network():
    """The tiny preset's shape: hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 key/value heads, vocabulary 1024."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.0),  # the SXM module
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA A10G", 125.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA H100", None),  # which H100 is not said: no peak rather than a guess
    ("NVIDIA GeForce RTX 4090", None),
    ("cpu", None),
])
def test_card_table(gpu, name, peak):
    assert gpu.bf16_peak(name) == peak


def test_forward_flops_by_hand(gpu, tiny_network):
    shape = gpu.model_shape(tiny_network)
    # Per layer: q and o 64 x 64, k and v 64 x 32, gate, up and down 64 x 128; embeddings and norms left out.
    assert shape == gpu.ModelShape(matrix_parameters=2 * (2 * 4096 + 2 * 2048 + 3 * 8192), hidden_size=64,
                                   vocab_size=1024, attention_per_key=4 * 2 * 4 * 16)
    # 2 rows of 3 new tokens after 5 cached keys, the last position's logits kept.
    matrices = 2 * 73728 * 6
    output = 2 * 64 * 1024 * 2  # not * 6: only the kept positions go through the output matrix
    attention = 512 * 2 * ((5 + 1) + (5 + 2) + (5 + 3))
    assert gpu.forward_flops(shape, rows=2, width=3, cached=5, logits_kept=1) == matrices + output + attention
    assert matrices + output + attention == 1_168_384


def test_counter_reads_the_cache_before_the_pass(gpu, tiny_network):
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=tiny_network.config)
    argument = gpu.cache_argument(tiny_network)
    with torch.inference_mode():
        tiny_network(input_ids=torch.ones(2, 5, dtype=torch.long), **{argument: cache})
        with gpu.ForwardCounter(tiny_network) as counter:
            tiny_network(input_ids=torch.ones(2, 3, dtype=torch.long), logits_to_keep=1, **{argument: cache})
            tiny_network(input_ids=torch.ones(1, 4, dtype=torch.long))  # no cache, every logit kept
    assert counter.passes == [(2, 3, 5, 1), (1, 4, 0, 4)]
    assert counter.tokens() == 10 and counter.logits() == 6


@pytest.mark.slow
def test_smoke_run_checks_its_own_counts():
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[-1] == {"smoke": "ok"}
    stages = [r.get("stage") for r in records]
    assert stages.count("generate") == 2 and "label-paper" in stages and "sft" in stages
    for record in records:
        if record.get("stage") == "generate":
            work = record["batch_size"] * record["new_tokens"]
            assert record["generated_tokens"] == dict.fromkeys(
                ("caictl_engine", "plain_generate", "plain_generate_static"), work)
        elif record.get("stage") == "label-paper":
            assert 0 < record["logits_computed"] < record["tokens_computed"]
