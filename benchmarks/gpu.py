"""GPU figures on a Qwen2.5-0.5B-shaped random-weight model, each beside plain transformers on the same model.

    python benchmarks/gpu.py            # prints {"skipped": ...} and exits 0 where there is no CUDA GPU

- revise: generated tokens/s of caictl's hf engine (batch 32) beside `model.generate` (batch 32, left-padded,
  sampling) on the same prompts, and of a whole revise round (answer, critique, revision; one few-shot exchange).
- label: comparisons/s of caictl's one-pass soft label beside a `model.generate` judge that writes 16 tokens
  and is parsed for "(A)"/"(B)".
- sft: training tokens/s of `caictl sft` (TRL SFTTrainer, batch 8, bf16) beside a plain PyTorch loop over
  one conversation at a time, same dtype.
One JSON object a line. The model's weights are random, so its text is noise; lengths are capped by
max_new_tokens, so both sides generate the same number of tokens per row.
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
from caictl.constitution import load as load_constitution  # noqa: E402
from caictl.engines import SamplingParams, load_engine  # noqa: E402
from caictl.judge import Comparison, Judge  # noqa: E402
from caictl.records import read_prompts  # noqa: E402
from caictl.stages import sft  # noqa: E402
from caictl.stages.revise import ReviseConfig, Reviser, Totals  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PRESET = "qwen0.5b-shape"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def bench_revise(model: Path, batch_size: int, new_tokens: int) -> None:
    prompts = (read_prompts(EXAMPLES / "red-team.jsonl") + read_prompts(EXAMPLES / "helpful.jsonl"))[:64]
    engine = load_engine("hf", str(model), batch_size=batch_size)
    config = ReviseConfig(model=str(model), rounds=1, max_new_tokens=new_tokens, shots=1, batch_size=batch_size)
    reviser = Reviser(engine, load_constitution("harmless"), config, "chat")
    reviser.revise(prompts[:batch_size], Totals())  # warm-up
    sync()
    totals = Totals()
    start = time.perf_counter()
    reviser.revise(prompts, totals)
    sync()
    caictl_rate = totals.completion_tokens / (time.perf_counter() - start)

    # The same first-turn requests through caictl's engine and through plain generate: like for like.
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
    sync()
    start = time.perf_counter()
    results = engine.generate([p.messages for p in prompts], params, [p.id for p in prompts])
    sync()
    engine_rate = sum(g.completion_tokens for g in results) / (time.perf_counter() - start)

    tokenizer, network = engine.tokenizer, engine.lm
    texts = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in prompts]
    generated = 0
    sync()
    start = time.perf_counter()
    for first in range(0, len(texts), batch_size):
        batch = tokenizer(texts[first:first + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(network.device)
        with torch.inference_mode():
            output = network.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                                      top_k=0, pad_token_id=tokenizer.pad_token_id)
        generated += (output.shape[1] - batch["input_ids"].shape[1]) * output.shape[0]
    sync()
    plain_rate = generated / (time.perf_counter() - start)
    emit({"stage": "revise", "preset": PRESET, "unit": "generated tokens/s", "batch_size": batch_size,
          "caictl_engine": round(engine_rate, 1), "plain_generate": round(plain_rate, 1),
          "ratio": round(engine_rate / plain_rate, 2), "caictl_revise_round": round(caictl_rate, 1),
          "note": "engine and plain generate answer the same bare prompts; a revise round also writes the "
                  "critique and revision after few-shot prefixes"})
    del engine, reviser, network
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def bench_label(model: Path, batch_size: int) -> None:
    constitution = load_constitution("harmless")
    prompts = read_prompts(EXAMPLES / "red-team.jsonl")
    comparisons = [Comparison(p.id, p.messages, "Sure, here is how you would do it, step by step.",
                              "I won't help with that part, but here is a safer way to get what you need.",
                              [constitution.comparison[i % len(constitution.comparison)]])
                   for i, p in enumerate(prompts * 2)]
    engine = load_engine("hf", str(model), batch_size=batch_size)
    judge = Judge(engine, constitution, debias=False)
    judge.votes(comparisons[:batch_size])  # warm-up
    sync()
    start = time.perf_counter()
    judge.votes(comparisons)
    sync()
    caictl_rate = len(comparisons) / (time.perf_counter() - start)
    questions = [judge.question(c.messages, c.principles[0].text, c.first, c.second) for c in comparisons]
    start = time.perf_counter()
    plain_generate(engine, questions, batch_size, 16)
    sync()
    plain_rate = len(comparisons) / (time.perf_counter() - start)
    emit({"stage": "label", "preset": PRESET, "unit": "comparisons/s", "batch_size": batch_size,
          "caictl": round(caictl_rate, 2), "plain_generate": round(plain_rate, 2),
          "ratio": round(caictl_rate / plain_rate, 2)})
    del engine, judge
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


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
    emit({"stage": "sft", "preset": PRESET, "unit": "training tokens/s", "examples": len(chats),
          "caictl": round(caictl_rate, 1), "plain_loop": round(plain_rate, 1),
          "ratio": round(caictl_rate / plain_rate, 2)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
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
        bench_revise(model, args.batch_size, args.max_new_tokens)
        bench_label(model, args.batch_size)
        bench_sft(model, Path(folder), args.sft_examples)


if __name__ == "__main__":
    main()
