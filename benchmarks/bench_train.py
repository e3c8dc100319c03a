"""Training throughput of sft, train-pm and ppo against a naive loop, same model, same data, same process.

    python benchmarks/bench_train.py --stage sft --preset small

Prints one JSON object: stage, preset, both throughputs and their ratio (caictl / naive).
- sft (examples/s): `caictl sft` (TRL's SFTTrainer, batched, assistant-only loss) against a loop that trains on
  one conversation at a time (forward with labels, backward, AdamW step).
- train-pm (comparisons/s): caictl's PM trainer (both texts of every pair of a batch in one forward pass)
  against a loop over pairs, chosen and rejected each through the model alone.
- ppo (steps/s): caictl's PPO step against the same step with its rollout generated one prompt at a time, as
  trl's PPOTrainer.generate did by default (batch_size=1); everything after the rollout is identical.
The model is a random-weight preset from `caictl init-model`; the responses are the constitution's few-shot
revisions, so every example has a real-length assistant turn.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from caictl import tiny
from caictl.constitution import load as load_constitution
from caictl.records import read_prompts
from caictl.stages.ppo import PPO

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def conversations(count: int) -> list[list[dict]]:
    prompts = read_prompts(EXAMPLES / "red-team.jsonl") + read_prompts(EXAMPLES / "helpful.jsonl")
    answers = [shot.revision for shot in load_constitution("harmless").few_shot]
    return [prompts[i % len(prompts)].messages + [{"role": "assistant", "content": answers[i % len(answers)]}]
            for i in range(count)]


def bench_sft(folder: Path, preset: str, count: int, batch_size: int, micro: int | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from caictl.stages import sft

    model = tiny.run(tiny.InitModelConfig(out=folder / preset, preset=preset))
    data = folder / "sft.jsonl"  # revise's --format hf records: messages ending with the revision
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(count)))
    metrics = sft.run(sft.SFTConfig(revisions=[str(data)], out=str(folder / "sft-out"), model=str(model),
                                    epochs=1, batch_size=batch_size, learning_rate=1e-4, max_length=512,
                                    save_steps=10_000, micro_batch_size=micro, overwrite=True))
    caictl_rate = metrics["examples"] / metrics["seconds"]

    tokenizer = AutoTokenizer.from_pretrained(model)
    network = AutoModelForCausalLM.from_pretrained(model)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    network.train()
    examples = conversations(count)
    start = time.perf_counter()
    for conversation in examples:
        ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"][:512]
        ids = torch.tensor([ids])
        loss = network(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    naive_rate = len(examples) / (time.perf_counter() - start)
    return {"unit": "examples/s", "examples": metrics["examples"], "batch_size": batch_size,
            "caictl": round(caictl_rate, 2), "naive": round(naive_rate, 2), "ratio": round(caictl_rate / naive_rate, 2),
            "baseline": "one conversation per step, plain PyTorch"}


def bench_train_pm(folder: Path, preset: str, count: int, batch_size: int, micro: int | None) -> dict:
    import torch

    from caictl.pm import Comparison, conversation_text
    from caictl.stages import train_pm

    backbone = tiny.run(tiny.InitModelConfig(out=folder / f"{preset}-pm", preset=preset, task="seq-cls"))
    rng = random.Random(0)
    pairs = [Comparison(conversation_text(c), conversation_text(c[:-1], c[-1]["content"][::-1]), rng.random())
             for c in conversations(count)]
    config = train_pm.TrainPMConfig(prefs=[], out=str(folder / "pm-out"), batch_size=batch_size, max_length=512,
                                    learning_rate=3e-5, micro_batch_size=micro)
    trainer = train_pm.Trainer(config, str(backbone))
    start = time.perf_counter()
    trainer.fit(pairs)
    caictl_rate = len(pairs) / (time.perf_counter() - start)

    naive = train_pm.Trainer(config, str(backbone))
    optimizer = torch.optim.AdamW(naive.model.parameters(), lr=3e-5)
    naive.model.train()
    start = time.perf_counter()
    for pair in pairs:
        chosen, rejected = naive.rewards([pair.chosen]), naive.rewards([pair.rejected])
        loss = train_pm.soft_pairwise_loss(chosen - rejected, torch.tensor([pair.p]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    naive_rate = len(pairs) / (time.perf_counter() - start)
    return {"unit": "comparisons/s", "comparisons": len(pairs), "batch_size": batch_size,
            "caictl": round(caictl_rate, 2), "naive": round(naive_rate, 2), "ratio": round(caictl_rate / naive_rate, 2),
            "baseline": "one pair per step, chosen and rejected in separate forward passes"}


def bench_ppo(folder: Path, preset: str, steps: int, batch_size: int) -> dict:
    from caictl.stages import ppo

    policy = tiny.run(tiny.InitModelConfig(out=folder / preset, preset=preset))
    pm = tiny.run(tiny.InitModelConfig(out=folder / f"{preset}-pm", preset=preset, task="seq-cls"))
    prompts = read_prompts(EXAMPLES / "red-team.jsonl")
    config = ppo.PPOConfig(prompts="-", policy=str(policy), pm=str(pm), out=str(folder / "ppo-out"),
                           steps=steps, batch_size=batch_size, minibatch_size=batch_size // 2, max_new_tokens=32)
    rates = {}
    for name, trainer_class in (("caictl", PPO), ("naive", OnePromptRollouts)):
        trainer = trainer_class(config)
        trainer.step(prompts[:batch_size], 0)  # warm-up
        start = time.perf_counter()
        for step in range(steps):
            trainer.step(prompts[(step * batch_size) % len(prompts):][:batch_size], step + 1)
        rates[name] = steps / (time.perf_counter() - start)
        del trainer
    return {"unit": "steps/s", "steps": steps, "batch_size": batch_size, "max_new_tokens": 32,
            "caictl": round(rates["caictl"], 4), "naive": round(rates["naive"], 4),
            "ratio": round(rates["caictl"] / rates["naive"], 2),
            "baseline": "the same PPO step, rollout generated one prompt at a time"}


class OnePromptRollouts(PPO):
    """caictl's PPO with the rollout generated prompt by prompt, then padded into one batch."""

    def rollout(self, prompts) -> dict:
        import torch

        one_prompt = super().rollout
        parts = [one_prompt([p]) for p in prompts]
        prompt_width = max(p["start"] for p in parts)
        response_width = max(p["ids"].shape[1] - p["start"] for p in parts)
        pad = self.tokenizer.pad_token_id
        ids, attention, mask = [], [], []
        for p in parts:
            left, right = prompt_width - p["start"], response_width - (p["ids"].shape[1] - p["start"])
            ids.append(torch.nn.functional.pad(p["ids"], (left, right), value=pad))
            attention.append(torch.nn.functional.pad(p["attention"], (left, right), value=0))
            mask.append(torch.nn.functional.pad(p["mask"], (0, right), value=0))
        return {"ids": torch.cat(ids), "attention": torch.cat(attention), "start": prompt_width,
                "mask": torch.cat(mask), "ended": torch.cat([p["ended"] for p in parts]),
                "responses": [r for p in parts for r in p["responses"]],
                "texts": [t for p in parts for t in p["texts"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True, choices=["sft", "train-pm", "ppo"])
    parser.add_argument("--preset", default="small", choices=sorted(tiny.PRESETS))
    parser.add_argument("--examples", type=int, default=64, help="sft examples / train-pm comparisons")
    parser.add_argument("--steps", type=int, default=3, help="ppo steps per side")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, help="sft/train-pm: caictl's default for the device if unset")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.stage == "sft":
            result = bench_sft(Path(folder), args.preset, args.examples, args.batch_size, args.micro_batch_size)
        elif args.stage == "train-pm":
            result = bench_train_pm(Path(folder), args.preset, args.examples, args.batch_size, args.micro_batch_size)
        else:
            result = bench_ppo(Path(folder), args.preset, args.steps, args.batch_size)
    print(json.dumps({"stage": args.stage, "preset": args.preset, "micro_batch_size": args.micro_batch_size or "default",
                      **result}), flush=True)


if __name__ == "__main__":
    main()
