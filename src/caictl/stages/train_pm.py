"""train-pm: a preference model (scalar head) trained on AI labels, with soft targets.

    caictl train-pm prefs.jsonl --mix hh-rlhf.jsonl.gz:1 --model minilm -o models/pm --eval-split 0.1

The loss is the soft-target pairwise loss -(p log s(rc - rr) + (1 - p) log s(rr - rc)), s the sigmoid, with
p the label's probability that `chosen` is better (1 for human labels and hard labels); `--margin m` asks for
rc - rr > m. `--mix` adds human comparisons (hh-rlhf rows as they are), as the paper mixed human
helpfulness data into its PM. Held-out metrics: accuracy, mean margin, and calibration (expected calibration
error against the labels' probabilities, with a reliability plot), on `--eval-split` and on every `--eval`
file. The folder loads with `AutoModelForSequenceClassification`; `caictl score` uses it.
Several processes: `torchrun --nproc_per_node N -m caictl train-pm ...` or `accelerate launch --num_processes N -m
caictl train-pm ...` (accelerate's Accelerator runs the loop under DDP); --batch-size is the whole step's batch.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from caictl import __version__, settings
from caictl.errors import InputError, UsageError
from caictl.metrics import pairwise_metrics, plot_reliability
from caictl.pm import Comparison, comparison_of, cut_tokens, prepare_tokenizer, resolve_backbone, rewards
from caictl.processes import is_main, rank, world_size
from caictl.records import file_hash, read_rows
from caictl.training import batch_split_problem, output_folder, warn_cut_examples
from caictl.ui import meter, quiet_transformers, summary_table

SCHEDULERS = ("linear", "constant", "cosine")


@dataclass
class TrainPMConfig:
    prefs: list[str]  # preference files: label output, prompt/chosen/rejected rows, hh-rlhf rows
    out: str
    model: str | None = None  # backbone: a causal LM or an encoder folder/hub id, or `minilm`
    mix: list[str] = field(default_factory=list)  # FILE[:WEIGHT] of other (human) comparisons
    prefs_weight: float = 1.0
    hard: bool = False  # train on 0/1 targets (p >= 0.5 -> 1) instead of the soft labels
    margin: float = 0.0  # rc - rr is asked to exceed this
    eval_split: float = 0.0  # share of the training comparisons held out
    eval: list[str] = field(default_factory=list)  # other comparison files to report on
    epochs: float = 1.0
    learning_rate: float = 3e-5
    scheduler: str = "constant"
    batch_size: int = 16  # comparisons per step, over all processes
    micro_batch_size: int | None = None  # texts per forward pass; default: all of a step's on GPU, 1 on CPU
    max_length: int = 512  # tokens kept from the END of each conversation
    lora: bool = False  # LoRA on the backbone; the scalar head trains fully and is saved with it
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    seed: int = 0
    overwrite: bool = False

    def check(self) -> None:
        problems = []
        if not self.prefs:
            problems.append("give at least one preference file (output of `caictl label`, or hh-rlhf rows)")
        for path in self.prefs + self.eval + [_split_weight(spec)[0] for spec in self.mix]:
            if not Path(path).exists():
                problems.append(f"{path}: no such file")
        if not 0 <= self.eval_split < 1:
            problems.append("--eval-split must be in [0, 1)")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"--scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if self.batch_size < 1 or self.max_length < 8 or self.epochs <= 0 or self.learning_rate <= 0:
            problems.append("--batch-size >= 1, --max-length >= 8, --epochs > 0 and --learning-rate > 0")
        if self.prefs_weight <= 0:
            problems.append("--prefs-weight must be > 0")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            problems.append("--micro-batch-size must be at least 1")
        if batch_split_problem(self.batch_size):
            problems.append(batch_split_problem(self.batch_size))
        if problems:
            raise UsageError("; ".join(problems))


def _split_weight(spec: str) -> tuple[str, float]:
    head, _, tail = spec.rpartition(":")
    try:
        return (head, float(tail)) if head else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def run(config: TrainPMConfig) -> dict:
    config.check()
    backbone = resolve_backbone(settings.require_model(config.model))
    out = output_folder(config.out, config.overwrite)
    rng = random.Random(config.seed)
    train = read_comparisons(config.prefs)
    held_out: list[Comparison] = []
    if config.eval_split:
        rng.shuffle(train)
        cut = max(1, round(len(train) * config.eval_split))
        held_out, train = train[:cut], train[cut:]
    counts = {"prefs": len(train)}
    for spec in config.mix:
        path, weight = _split_weight(spec)
        rows = read_comparisons([path])
        wanted = round(counts["prefs"] * weight / config.prefs_weight) if counts["prefs"] else len(rows)
        rng.shuffle(rows)
        picked = [rows[i % len(rows)] for i in range(wanted)] if rows else []
        counts[path] = len(picked)
        train += picked
    if not train:
        raise UsageError("no comparisons to train on")
    if config.hard:
        train = [Comparison(c.chosen, c.rejected, 1.0 if c.p >= 0.5 else 0.0) for c in train]
    evaluations = {"held_out": held_out} if held_out else {}
    for path in config.eval:
        evaluations[path] = read_comparisons([path])
        if not evaluations[path]:
            raise InputError(f"{path}: no comparisons to evaluate on")

    trainer = Trainer(config, backbone)
    cut = cut_tokens(trainer.tokenizer, [t for c in train for t in (c.chosen, c.rejected)], config.max_length)
    truncated = sum(a + b > 0 for a, b in zip(cut[::2], cut[1::2]))
    warn_cut_examples(truncated, len(train), "comparisons", config.max_length)
    start = time.perf_counter()
    history = trainer.fit(train)
    seconds = time.perf_counter() - start
    trainer.save(out)  # before evaluating: a trained model is never lost to a problem with an eval file
    if not is_main():  # the main process evaluates, writes the folder and reports
        return {}
    metrics = {name: evaluate(trainer, comparisons) for name, comparisons in evaluations.items()}
    info = {
        "stage": "train-pm",
        "caictl_version": __version__,
        "world_size": world_size(),
        "backbone": backbone,
        "inputs": [{"path": p, "sha256": file_hash(p)}
                   for p in config.prefs + [_split_weight(s)[0] for s in config.mix]],
        "options": asdict(config),
        "metrics": {
            "train_comparisons": len(train),
            "comparisons_per_source": counts,
            "truncated_examples": truncated,
            "steps": len(history),
            "seconds": round(seconds, 2),
            "comparisons_per_s": round(len(train) * config.epochs / seconds, 2) if seconds else None,
            "loss_history": history,
            "eval": {name: {k: v for k, v in m.items() if k != "reliability"} for name, m in metrics.items()},
        },
    }
    (out / "caictl.json").write_text(json.dumps(info, indent=2) + "\n")
    plot_training(history, out / "training.png")
    if metrics:
        plot_reliability(metrics, out / "reliability.png")
    rows = [("output", out), ("comparisons", f"{len(train)} {counts}"), ("steps", len(history)),
            ("loss first -> last", f"{history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}" if history else "-")]
    rows += [(f"eval {name}", f"accuracy {m['accuracy']:.3f}, margin {m['mean_margin']:.3f}, ECE {m['ece']:.3f} "
                              f"({m['comparisons']} pairs)") for name, m in metrics.items()]
    summary_table("train-pm", rows)
    return info["metrics"]


def read_comparisons(paths: list[str]) -> list[Comparison]:
    comparisons = []
    for path in paths:
        for row in read_rows(path):
            try:
                comparisons.append(comparison_of(row.data))
            except ValueError as error:
                raise InputError(f"{row.where}: {error}")
    return comparisons


class Trainer:
    """A plain PyTorch loop over pairs: both texts of a pair go through the model in one batch. accelerate's
    Accelerator places it on this process's device and, under torchrun / accelerate launch, wraps it for DDP
    (or what an accelerate config asks for)."""

    def __init__(self, config: TrainPMConfig, backbone: str):
        import torch
        from accelerate import Accelerator
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        quiet_transformers()
        self.config = config
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        torch.manual_seed(config.seed)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(backbone)
            model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
        except OSError as error:
            raise UsageError(f"cannot load backbone {backbone!r} ({str(error).splitlines()[0]})")
        prepare_tokenizer(self.tokenizer, model)
        if config.lora:
            from peft import LoraConfig, get_peft_model

            # SEQ_CLS keeps the new scalar head trainable and saves it with the adapter.
            model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                     lora_dropout=config.lora_dropout, task_type="SEQ_CLS",
                                                     target_modules="all-linear"))
        self.model = model.to(self.device)  # unwrapped: scoring after training, and saving

    def rewards(self, texts: list[str], model=None):
        # On a CPU one text at a time beats padded batches (benchmarks/bench_train.py); a GPU takes them all.
        micro = self.config.micro_batch_size or (len(texts) if self.device.type == "cuda" else 1)
        return rewards(model or self.model, self.tokenizer, texts, self.config.max_length, micro)

    def fit(self, comparisons: list[Comparison]) -> list[dict]:
        import torch
        from transformers import get_scheduler

        config = self.config
        order_rng = random.Random(config.seed)
        per_epoch = -(-len(comparisons) // config.batch_size)
        total = max(1, round(per_epoch * config.epochs))
        optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=config.learning_rate)
        # The schedule is left unprepared: accelerate would step it once per process at each step.
        schedule = get_scheduler(config.scheduler, optimizer, num_warmup_steps=0, num_training_steps=total)
        model, optimizer = self.accelerator.prepare(self.model, optimizer)  # wrapped for DDP under several processes
        history = []
        model.train()
        with meter(total, "train-pm", unit="steps") as progress:
            step = 0
            while step < total:
                order = list(range(len(comparisons)))
                order_rng.shuffle(order)
                for first in range(0, len(order), config.batch_size):
                    if step >= total:
                        break
                    batch = [comparisons[i] for i in order[first:first + config.batch_size]]
                    mine, weights = shard(batch, rank(), world_size())
                    rewards = self.rewards([c.chosen for c in mine] + [c.rejected for c in mine], model)
                    chosen, rejected = rewards[: len(mine)], rewards[len(mine):]
                    targets = torch.tensor([c.p for c in mine], device=self.device)
                    weights = torch.tensor(weights, device=self.device)
                    losses = soft_pairwise_loss(chosen - rejected, targets, config.margin, reduction="none") * weights
                    # The step's loss is the mean over the whole batch. DDP averages the processes' gradients, so
                    # each process's sum is scaled by (processes / batch); one process: the plain mean.
                    optimizer.zero_grad()
                    self.accelerator.backward(losses.sum() * world_size() / len(batch))
                    self.accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    schedule.step()
                    step += 1
                    right = ((chosen > rejected).float() == (targets >= 0.5).float()).float() * weights
                    totals = self.accelerator.reduce(torch.stack([losses.sum(), right.sum()]).detach(), "sum")
                    history.append({"step": step, "loss": round(totals[0].item() / len(batch), 6),
                                    "accuracy": round(totals[1].item() / len(batch), 4)})
                    progress.advance(1)
        model.eval()
        return history

    def save(self, out: Path) -> None:
        """The main process writes; every process calls this, as FSDP or ZeRO-3 would gather the shards."""
        self.accelerator.wait_for_everyone()
        if not is_main():
            return
        model = self.model
        if self.config.lora:
            model.save_pretrained(out / "adapter")
            model = model.merge_and_unload()  # the folder itself is the merged model, head included
        model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)


def shard(batch: list, rank: int, processes: int) -> tuple[list, list[float]]:
    """This process's rows of a step's batch, and their weights: every processes-th row from its rank, weight 1.
    A batch that does not divide evenly (an epoch's last) leaves some processes a row short: they score the
    batch's first rows again with weight 0, so that every process runs as many forward passes as the others
    (DDP synchronises each one) and a backward pass."""
    mine = batch[rank::processes]
    short = -(-len(batch) // processes) - len(mine)
    return mine + batch[:short], [1.0] * len(mine) + [0.0] * short


def soft_pairwise_loss(difference, targets, margin: float = 0.0, reduction: str = "mean"):
    """-(p log s(d - m) + (1 - p) log s(-(d - m))): binary cross-entropy of the reward difference against p."""
    import torch

    return torch.nn.functional.binary_cross_entropy_with_logits(difference - margin, targets, reduction=reduction)


def evaluate(trainer: Trainer, comparisons: list[Comparison]) -> dict:
    """Accuracy, mean margin and calibration of the trained PM on held-out comparisons."""
    import torch

    differences = []
    with torch.inference_mode():
        for start in range(0, len(comparisons), trainer.config.batch_size):
            batch = comparisons[start:start + trainer.config.batch_size]
            rewards = trainer.rewards([c.chosen for c in batch] + [c.rejected for c in batch])
            differences += (rewards[: len(batch)] - rewards[len(batch):]).tolist()
    return pairwise_metrics(differences, [c.p for c in comparisons])


def plot_training(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [h["step"] for h in history]
    left.plot(steps, [h["loss"] for h in history])
    left.set_xlabel("step")
    left.set_ylabel("soft pairwise loss")
    right.plot(steps, [h["accuracy"] for h in history])
    right.set_xlabel("step")
    right.set_ylabel("batch accuracy")
    figure.suptitle("caictl train-pm")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
