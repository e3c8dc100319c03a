"""GPU figures on a Qwen2.5-0.5B-shaped random-weight model, each beside plain transformers on the same model.

    PYTHONPATH=src python benchmarks/gpu.py      # {"skipped": ...} where there is no CUDA GPU
    PYTHONPATH=src python benchmarks/gpu.py --smoke   # the tiny preset on the CPU: checks the script runs

- generate: generated tokens/s and ms a decoding step of caictl's hf engine (static cache, compiled decoding on
  CUDA) beside plain `model.generate` (sampling, left-padded), same prompts, same new tokens, at batch 1, 16, 64.
- label-paper: comparisons/s of caictl's labelling at the paper's settings (few-shot labelling examples, 4
  principles a pair, both orders; shared-prefix scoring) beside a `model.generate` judge that writes 16 tokens,
  and the scoring pass's TFLOP/s (2 x parameters x tokens computed, plus attention) against the card's bf16 peak.
- sft: training tokens/s of `caictl sft` (TRL SFTTrainer, batch 8, bf16) beside a plain PyTorch loop over one
  conversation at a time, and caictl's model FLOP utilisation (6 x parameters x tokens/s over the bf16 peak).
One JSON object a line. The model's weights are random, so its text is noise; lengths are capped by
max_new_tokens (and min_new_tokens on the plain side), so both sides generate the same number of tokens per row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_label import plain_generate  # noqa: E402
from bench_train import conversations  # noqa: E402

from caictl import tiny  # noqa: E402
from caictl.data.constitution import load as load_constitution  # noqa: E402
from caictl.data.reading import read_prompts  # noqa: E402
from caictl.engines import SamplingParams, load_engine  # noqa: E402
from caictl.feedback.judge import Judge, PairToJudge  # noqa: E402
from caictl.stages import sft  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PRESET = "qwen0.5b-shape"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# Dense bf16 tensor-core peaks (TFLOP/s) by card name, from the vendors' data sheets.
BF16_PEAK = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
             "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def bf16_peak() -> float | None:
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else ""
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def utilisation(tflops: float) -> float | None:
    peak = bf16_peak()
    return round(tflops / peak, 3) if peak else None


def parameters(network, embedding: bool = False) -> int:
    """Parameters a token's forward pass multiplies by (the input embedding is a lookup, not a product)."""
    skip = set() if embedding else {id(network.get_input_embeddings().weight)}
    total = sum(p.numel() for p in network.parameters() if id(p) not in skip)
    if not embedding and network.config.tie_word_embeddings:
        total += network.get_input_embeddings().weight.numel()  # the tied output matrix is a product
    return total


def bench_generate(model: Path, batch_sizes: list[int], new_tokens: int) -> None:
    prompts = (read_prompts(EXAMPLES / "red-team.jsonl") + read_prompts(EXAMPLES / "helpful.jsonl"))
    engine = load_engine("hf", str(model), batch_size=max(batch_sizes))
    tokenizer, network = engine.tokenizer, engine.lm
    for batch_size in batch_sizes:
        chosen = (prompts * (1 + batch_size // len(prompts)))[:batch_size]
        engine.batch_size = batch_size
        params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
        keys = [f"{p.id}/{i}" for i, p in enumerate(chosen)]

        def caictl_side():
            results = engine.generate([p.messages for p in chosen], params, keys)
            return sum(g.completion_tokens for g in results)

        texts = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
                 for p in chosen]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(network.device)

        def plain_side():
            with torch.inference_mode():
                output = network.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                          do_sample=True, top_k=0, pad_token_id=tokenizer.pad_token_id)
            return (output.shape[1] - batch["input_ids"].shape[1]) * output.shape[0]

        rates = {}
        for name, side in (("caictl_engine", caictl_side), ("plain_generate", plain_side)):
            side()  # warm-up (and, on CUDA, compiling caictl's decoding step for this shape)
            sync()
            start = time.perf_counter()
            tokens = side()
            sync()
            seconds = time.perf_counter() - start
            rates[name] = (tokens / seconds, seconds / new_tokens * 1000)
        emit({"stage": "generate", "preset": PRESET, "unit": "generated tokens/s", "batch_size": batch_size,
              "new_tokens": new_tokens, "caictl_engine": round(rates["caictl_engine"][0], 1),
              "plain_generate": round(rates["plain_generate"][0], 1),
              "caictl_ms_per_step": round(rates["caictl_engine"][1], 2),
              "plain_ms_per_step": round(rates["plain_generate"][1], 2),
              "ratio": round(rates["caictl_engine"][0] / rates["plain_generate"][0], 2)})


def bench_label(model: Path, batch_size: int, pairs: int) -> None:
    constitution = load_constitution("harmless")
    principles = constitution.comparison
    prompts = read_prompts(EXAMPLES / "red-team.jsonl")
    comparisons = [PairToJudge(p.id, p.messages, "Sure, here is how you would do it, step by step.",
                              "I won't help with that part, but here is a safer way to get what you need.",
                              [principles[(i + k) % len(principles)] for k in range(4)])
                   for i, p in enumerate((prompts * (1 + pairs // len(prompts)))[:pairs])]
    engine = load_engine("hf", str(model), batch_size=batch_size)
    network = engine.lm
    judge = Judge(engine, constitution, few_shot=True, debias=True)
    judge.votes(comparisons[:2])  # warm-up
    # FLOPs of the scoring pass: every token computed multiplies by every parameter (2 FLOPs each) and attends
    # to the tokens before it (4 x hidden FLOPs a key, over all layers).
    computed = []
    config = network.config
    attention_per_key = 4 * config.num_hidden_layers * config.num_attention_heads * (
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    def count(module, inputs, kwargs, output):
        ids = kwargs.get("input_ids", inputs[0] if inputs else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        before = cache.get_seq_length() if cache is not None else 0
        width = ids.shape[1]
        # Each row's queries see the cached keys and those up to their own position (padding included).
        computed.append((ids.numel(), ids.shape[0] * width * (before + (width + 1) / 2)))

    engine.forget_prefixes()
    hook = network.register_forward_hook(count, with_kwargs=True)
    sync()
    start = time.perf_counter()
    judge.votes(comparisons)
    sync()
    seconds = time.perf_counter() - start
    hook.remove()
    flops = sum(2 * parameters(network) * tokens + attention_per_key * keys for tokens, keys in computed)
    caictl_rate = len(comparisons) / seconds
    questions = [judge.question(c.messages, p.text, a, b) for c in comparisons for p in c.principles
                 for a, b in ((c.first, c.second), (c.second, c.first))]
    plain_generate(engine, questions[:batch_size], batch_size, 16)  # warm-up
    sync()
    start = time.perf_counter()
    plain_generate(engine, questions, batch_size, 16)
    sync()
    plain_rate = len(comparisons) / (time.perf_counter() - start)
    tflops = flops / seconds / 1e12
    emit({"stage": "label-paper", "preset": PRESET, "unit": "comparisons/s", "batch_size": batch_size,
          "comparisons": len(comparisons), "questions": len(questions), "caictl": round(caictl_rate, 2),
          "plain_generate": round(plain_rate, 2), "ratio": round(caictl_rate / plain_rate, 2),
          "tokens_computed": sum(t for t, _ in computed), "scoring_tflops": round(tflops, 2),
          "bf16_peak_tflops": bf16_peak(), "peak_fraction": utilisation(tflops),
          "note": "the whole labelling call is timed, tokenization and prefix matching included"})


def bench_sft(model: Path, folder: Path, examples: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = folder / "sft.jsonl"
    chats = conversations(examples)
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    metrics = sft.run(sft.SFTConfig(revisions=[str(data)], out=str(folder / "sft-out"), model=str(model), epochs=1,
                                    batch_size=8, learning_rate=1e-5, max_length=512, save_steps=10_000,
                                    overwrite=True))
    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = [min(len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]), 512)
               for c in chats]
    caictl_rate = sum(lengths) / metrics["seconds"]

    dtype = torch.bfloat16 if DEVICE == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    network = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(DEVICE).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-5)
    sync()
    start = time.perf_counter()
    for chat in chats:
        ids = torch.tensor([tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"][:512]],
                           device=DEVICE)
        loss = network(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sync()
    plain_rate = sum(lengths) / (time.perf_counter() - start)
    tflops = 6 * parameters(network) * caictl_rate / 1e12
    emit({"stage": "sft", "preset": PRESET, "unit": "training tokens/s", "examples": len(chats),
          "caictl": round(caictl_rate, 1), "plain_loop": round(plain_rate, 1),
          "ratio": round(caictl_rate / plain_rate, 2), "caictl_tflops": round(tflops, 2),
          "bf16_peak_tflops": bf16_peak(), "mfu": utilisation(tflops)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,16,64", help="generation batch sizes, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--label-batch-size", type=int, default=32)
    parser.add_argument("--label-pairs", type=int, default=64)
    parser.add_argument("--sft-examples", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="run on the CPU with the tiny preset (checks the script)")
    args = parser.parse_args()
    global PRESET
    if args.smoke:
        PRESET = "tiny"
    elif DEVICE != "cuda":
        emit({"skipped": "no CUDA GPU on this machine"})
        return
    emit({"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
          "preset": PRESET})
    with tempfile.TemporaryDirectory() as folder:
        model = tiny.run(tiny.InitModelConfig(out=Path(folder) / PRESET, preset=PRESET))
        for bench in (lambda: bench_generate(model, [int(b) for b in args.batch_sizes.split(",")], args.max_new_tokens),
                      lambda: bench_label(model, args.label_batch_size, args.label_pairs)):
            bench()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()  # what the last one held is freed with its frame
        bench_sft(model, Path(folder), args.sft_examples)


if __name__ == "__main__":
    main()
