"""Training throughput of sft, train-pm and ppo against a plain loop, same model, same data, same process.

    python benchmarks/bench_train.py --stage sft --preset small

Prints one JSON object: stage, preset, both throughputs and their ratio (caictl / baseline). The sides take
turns, each warmed up first on a slice of its work (see interleave.py); `ratio` is the median of per-round
ratios, with its min and max. Every round both sides do the same work from the same starting weights.
- sft (examples/s): `caictl sft` (TRL's SFTTrainer, batched, assistant-only loss) against a loop that trains on
  one conversation at a time (forward with labels, backward, AdamW step).
- train-pm (comparisons/s): caictl's PM trainer (both texts of every pair of a batch in one forward pass)
  against a loop over pairs, chosen and rejected each through the model alone.
- ppo (steps/s): caictl's PPO step against the same step with its rollout written as a user would: one
  left-padded batch through `model.generate` at the step's batch size (TRL's old PPOTrainer.generate batched
  by 4 by default). caictl's rollout is exactly that call, so today both sides run the same code and the
  ratio shows the measurement's own spread; everything after the rollout is identical anyway.
The model is a random-weight preset from `caictl init-model`; the responses are the constitution's few-shot
revisions, so every example has a real-length assistant turn.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from interleave import interleave, ratio, throughputs, timed

from caictl.data.constitution import load as load_constitution
from caictl.data.reading import read_prompts
from caictl.rl.ppo import PPO
from caictl.stages import init_model as tiny

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WARM_UP = 8  # examples, comparisons or (ppo) steps' worth of prompts each side warms up on


def conversations(count: int) -> list[list[dict]]:
    prompts = read_prompts(EXAMPLES / "red-team.jsonl") + read_prompts(EXAMPLES / "helpful.jsonl")
    answers = [shot.revision for shot in load_constitution("harmless").few_shot]
    return [prompts[i % len(prompts)].messages + [{"role": "assistant", "content": answers[i % len(answers)]}]
            for i in range(count)]


def bench_sft(folder: Path, preset: str, count: int, batch_size: int, micro: int | None, rounds: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from caictl.stages import sft

    model = tiny.run(tiny.InitModelConfig(out=folder / preset, preset=preset))
    tokenizer = AutoTokenizer.from_pretrained(model)
    examples = conversations(count)

    def caictl(examples=examples) -> float:
        data = folder / "sft.jsonl"  # revise's --format hf records: messages ending with the revision
        data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in examples))
        metrics = sft.run(sft.SFTConfig(revisions=[str(data)], out=str(folder / "sft-out"), model=str(model),
                                        epochs=1, batch_size=batch_size, learning_rate=1e-4, max_length=512,
                                        save_steps=10_000, micro_batch_size=micro, overwrite=True))
        assert metrics["examples"] == len(examples), metrics["examples"]  # the baseline's examples, no more
        return metrics["seconds"]  # trainer.train() alone: loading, tokenising and saving stay outside

    def baseline(examples=examples) -> float:
        network = AutoModelForCausalLM.from_pretrained(model)
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
        network.train()

        def loop():
            for conversation in examples:
                ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"][:512]
                ids = torch.tensor([ids])
                loss = network(input_ids=ids, labels=ids).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return timed(loop)

    seconds = interleave({"caictl": caictl, "baseline": baseline}, rounds,
                         warm_ups={"caictl": lambda: caictl(examples[:WARM_UP]),
                                   "baseline": lambda: baseline(examples[:WARM_UP])})
    return summary(seconds, "examples/s", {"examples": count, "batch_size": batch_size},
                   dict.fromkeys(("caictl", "baseline"), count), "one conversation per step, plain PyTorch")


def bench_train_pm(folder: Path, preset: str, count: int, batch_size: int, micro: int | None, rounds: int) -> dict:
    import torch

    from caictl.models.pm import PreferencePair, conversation_text
    from caictl.stages import train_pm

    backbone = tiny.run(tiny.InitModelConfig(out=folder / f"{preset}-pm", preset=preset, task="seq-cls"))
    rng = random.Random(0)
    pairs = [PreferencePair(conversation_text(c), conversation_text(c[:-1], c[-1]["content"][::-1]), rng.random())
             for c in conversations(count)]
    config = train_pm.TrainPMConfig(prefs=[], out=str(folder / "pm-out"), batch_size=batch_size, max_length=512,
                                    epochs=1, learning_rate=3e-5, micro_batch_size=micro)

    def caictl(pairs=pairs) -> float:
        trainer = train_pm.Trainer(config, str(backbone))
        return timed(lambda: trainer.fit(pairs))

    def baseline(pairs=pairs) -> float:
        naive = train_pm.Trainer(config, str(backbone))  # the same model and tokenizer, loaded the same way
        optimizer = torch.optim.AdamW(naive.model.parameters(), lr=3e-5)
        naive.model.train()

        def loop():
            for pair in pairs:
                chosen, rejected = naive.rewards([pair.chosen]), naive.rewards([pair.rejected])
                loss = train_pm.soft_pairwise_loss(chosen - rejected, torch.tensor([pair.p]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return timed(loop)

    seconds = interleave({"caictl": caictl, "baseline": baseline}, rounds,
                         warm_ups={"caictl": lambda: caictl(pairs[:WARM_UP]),
                                   "baseline": lambda: baseline(pairs[:WARM_UP])})
    return summary(seconds, "comparisons/s", {"comparisons": count, "batch_size": batch_size},
                   dict.fromkeys(("caictl", "baseline"), count),
                   "one pair per step, chosen and rejected in separate forward passes")


def bench_ppo(folder: Path, preset: str, steps: int, batch_size: int, rounds: int) -> dict:
    from caictl.stages import ppo

    policy = tiny.run(tiny.InitModelConfig(out=folder / preset, preset=preset))
    pm = tiny.run(tiny.InitModelConfig(out=folder / f"{preset}-pm", preset=preset, task="seq-cls"))
    prompts = read_prompts(EXAMPLES / "red-team.jsonl")
    config = ppo.PPOConfig(prompts="-", policy=str(policy), pm=str(pm), out=str(folder / "ppo-out"),
                           steps=steps, batch_size=batch_size, minibatch_size=batch_size // 2, max_new_tokens=32)
    batches = [prompts[(step * batch_size) % len(prompts):][:batch_size] for step in range(steps)]

    def side(trainer_class):
        def run(batches=batches) -> float:
            trainer = trainer_class(config)  # fresh weights, optimizer and reward statistics every round
            return timed(lambda: [trainer.step(batch, step + 1) for step, batch in enumerate(batches)])
        return run

    # The baseline's rollout is one left-padded `model.generate` over the step's whole batch, as a careful user
    # writes it; PPO.rollout is exactly that call, so both sides run PPO. Should PPO.rollout ever do more than
    # that call, write the plain call out here as the baseline's.
    caictl, baseline = side(PPO), side(PPO)
    seconds = interleave({"caictl": caictl, "baseline": baseline}, rounds,
                         warm_ups={"caictl": lambda: caictl(batches[:1]), "baseline": lambda: baseline(batches[:1])})
    return summary(seconds, "steps/s", {"steps": steps, "batch_size": batch_size, "max_new_tokens": 32},
                   dict.fromkeys(("caictl", "baseline"), steps),
                   f"the same PPO step, rollout: one left-padded model.generate of the batch ({batch_size})", digits=4)


def summary(seconds: list[dict], unit: str, sizes: dict, work: dict, baseline: str, digits: int = 2) -> dict:
    rates = throughputs(seconds, work)
    return {"unit": unit, **sizes, "rounds": len(seconds), "caictl": round(rates["caictl"], digits),
            "naive": round(rates["baseline"], digits), **ratio(seconds, work, "caictl", "baseline"),
            "baseline": baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True, choices=["sft", "train-pm", "ppo"])
    parser.add_argument("--preset", default="small", choices=sorted(tiny.PRESETS))
    parser.add_argument("--examples", type=int, default=16, help="sft examples / train-pm comparisons per round")
    parser.add_argument("--steps", type=int, default=1, help="ppo steps per side and round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, help="sft/train-pm: caictl's default for the device if unset")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each side once per round)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.stage == "sft":
            result = bench_sft(Path(folder), args.preset, args.examples, args.batch_size, args.micro_batch_size,
                               args.rounds)
        elif args.stage == "train-pm":
            result = bench_train_pm(Path(folder), args.preset, args.examples, args.batch_size, args.micro_batch_size,
                                    args.rounds)
        else:
            result = bench_ppo(Path(folder), args.preset, args.steps, args.batch_size, args.rounds)
    print(json.dumps({"stage": args.stage, "preset": args.preset,
                      "micro_batch_size": args.micro_batch_size or "default", **result}), flush=True)


if __name__ == "__main__":
    main()
