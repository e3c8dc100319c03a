r"""sft: supervised fine-tuning on the revisions (SL-CAI), mixed with helpfulness data, on TRL's SFTTrainer.

    caictl sft revisions.jsonl --mix helpful.jsonl:0.5 --model models/base \
        -o models/sl-cai

Each prompt trains on its final revision, or with `--revisions all` on every round's revision as the paper
did (section 3.1). `--mix FILE[:WEIGHT]` adds other chat data; the weights set each source's share of the
training set (the revisions' weight is `--revisions-weight`). The main input and `--mix` read the same rows:
revise records (caictl's, `--format hf`, Anthropic's SL-CAI samples) and chat rows.

Only assistant tokens carry loss: each assistant message's content and the end-of-turn token that closes it
(`<|im_end|>`, `<|eot_id|>`, `<|end|>`), nothing of the prompt. A chat template with `{% generation %}` markers
tells them apart: `--chat-template FILE` when given, else the model's own template when it has the markers,
else TRL's training version of it (Qwen2.5, Phi-3/3.5, Llama 3, Gemma, ...), else caictl's (`chat_templates/`:
Llama 3.1). caictl tokenizes the rows itself and cuts the marked spans to exactly those tokens
(caictl.models.chat_training), so the mask can be read off the trainer's dataset. The output folder loads with
`AutoModelForCausalLM.from_pretrained` and keeps the model's original template; `caictl.json` beside it records
the inputs with their hashes, the options, the template trained with, and the metrics with the loss history.
Several processes (GPUs): `torchrun --nproc_per_node N -m caictl sft ...` or `accelerate launch --num_processes N
-m caictl sft ...`; --batch-size stays the whole step's batch, each process taking an equal share.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from caictl import settings
from caictl.data.conversation import parse_transcript, prompt_from_text
from caictl.data.reading import read_rows
from caictl.data.records import to_revision
from caictl.errors import InputError, UsageError
from caictl.models import kind as model_kind
from caictl.models.chat_training import (
    GENERATION_MARKER,
    chat_template_text,
    describe_template,
    template_sha256,
    tokenize,
    training_template,
)
from caictl.models.processes import is_main, leave_process_group
from caictl.models.training import (
    batch_split_problem,
    console_args,
    micro_batch,
    output_folder,
    per_process,
    precision,
    precision_problem,
    pure_bf16_option,
    save_model,
    trainer_progress,
    trl_device_args,
    warn_cut_examples,
    write_model_info,
)
from caictl.options import INPUT_OUTPUT, LORA, MODEL_ENGINE, RUNS, TRAINING, common, option
from caictl.ui import log, quiet_transformers, summary_table

REVISION_MODES = ("final", "all")
SCHEDULERS = ("constant", "linear", "cosine", "constant_with_warmup")


@dataclass
class SFTConfig:
    revisions: list[str] = option(
        help="revise output (caictl, --format hf, Anthropic SL-CAI samples) or chat data file(s): the rows --mix "
        "reads.", panel=INPUT_OUTPUT, argument=True)
    out: str = option(help="Output model folder.", panel=INPUT_OUTPUT, short="-o")
    model: str | None = option(None, "The base model to fine-tune: a folder or hub id; unset: CAICTL_MODEL, else "
                                     "`model:` in caictl.yaml.", MODEL_ENGINE)
    revisions_mode: str = option(
        "final", "final: each prompt's last usable revision; all: every round's revision (the paper).", INPUT_OUTPUT,
        flag="--revisions")
    revisions_weight: float = option(1.0, "The revisions' share weight against --mix.", INPUT_OUTPUT)
    mix: list[str] = option(
        help="Other chat data mixed in (messages, prompt/completion, hh-rlhf chosen), with a share weight. "
        "Repeatable.", panel=INPUT_OUTPUT, default_factory=list, repeat=True, metavar="FILE[:WEIGHT]")
    lora: bool = option(False, "Train a LoRA adapter instead of all weights.", LORA)
    lora_r: int = option(16, "LoRA rank.", LORA)
    lora_alpha: int = option(32, "LoRA alpha.", LORA)
    lora_dropout: float = option(0.05, "LoRA dropout.", LORA)
    lora_target: str = option("all-linear", "peft target_modules: all-linear, or comma-separated module names.", LORA)
    merge: bool = option(False, "With --lora: save the merged model as OUT (the adapter in OUT/adapter).", LORA)
    epochs: float = option(1.0, "Passes over the data.", TRAINING)
    max_steps: int = option(-1, "Stop after N optimizer steps; > 0 overrides --epochs.", TRAINING)
    learning_rate: float | None = option(None, "Learning rate; unset: 2e-5, or 2e-4 with --lora.", TRAINING)
    scheduler: str = option(
        "constant", "Learning-rate schedule: constant (the paper), linear, cosine or constant_with_warmup.", TRAINING)
    warmup_steps: int = option(0, "Learning-rate warm-up steps.", TRAINING)
    batch_size: int = option(8, "Examples per optimizer step, over all processes.", TRAINING)
    grad_accum: int = option(1, "Gradient accumulation steps.", TRAINING)
    micro_batch_size: int | None = option(
        None, "Examples per forward pass within a step; unset: the batch on GPU, 1 on CPU (faster there).", TRAINING)
    max_length: int = option(1024, "Tokens per example; longer ones are cut and counted.", TRAINING)
    pure_bf16: bool = pure_bf16_option()
    seed: int = common("seed", 0)
    chat_template: str | None = option(
        None, "Jinja chat template with {% generation %} markers to train with (the output keeps the model's own "
        "template).", TRAINING)
    save_steps: int = option(100, "Checkpoint every N optimizer steps (a re-run resumes from the last).", RUNS)
    resume: bool = option(
        False, "Require a checkpoint to resume from (a re-run resumes from one it finds anyway).", RUNS)
    overwrite: bool = option(False, "Discard an earlier model and checkpoints in OUT.", RUNS)

    def check(self) -> None:
        problems = []
        if not self.revisions:
            problems.append("give at least one revisions file (output of `caictl revise`)")
        for path in self.revisions + [spec.rsplit(":", 1)[0] if _has_weight(spec) else spec for spec in self.mix]:
            if not Path(path).exists():
                problems.append(f"{path}: no such file")
        for spec in self.mix:
            if _has_weight(spec) and not float(spec.rsplit(":", 1)[1]) > 0:
                problems.append(f"--mix {spec}: the weight must be > 0")
        if self.revisions_mode not in REVISION_MODES:
            problems.append(f"--revisions {self.revisions_mode!r}: choose one of {', '.join(REVISION_MODES)}")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"--scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if self.merge and not self.lora:
            problems.append("--merge only applies with --lora")
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_length < 16 or self.revisions_weight <= 0:
            problems.append("--batch-size and --grad-accum must be >= 1, --max-length >= 16, --revisions-weight > 0")
        if batch_split_problem(self.batch_size):
            problems.append(batch_split_problem(self.batch_size))
        if precision_problem(self.pure_bf16, self.lora):
            problems.append(precision_problem(self.pure_bf16, self.lora))
        if self.epochs <= 0 and self.max_steps <= 0:
            problems.append("--epochs must be > 0 (or set --max-steps)")
        if self.chat_template and not Path(self.chat_template).is_file():
            problems.append(f"--chat-template {self.chat_template}: no such file")
        elif self.chat_template and not GENERATION_MARKER.search(Path(self.chat_template).read_text(encoding="utf-8")):
            problems.append(f"--chat-template {self.chat_template}: no {{% generation %}} ... {{% endgeneration %}} "
                            "markers around the assistant's content and end-of-turn token")
        if problems:
            raise UsageError("; ".join(problems))


def _has_weight(spec: str) -> bool:
    head, _, tail = spec.rpartition(":")
    if not head:
        return False
    try:
        float(tail)
    except ValueError:
        return False
    return True


def run(config: SFTConfig) -> dict:
    """Train and save; return the metrics written to caictl.json."""
    config.check()
    model_name = settings.require_model(config.model)
    model_kind.check(model_name, model_kind.CAUSAL_LM, "--model")
    out = output_folder(config.out, config.overwrite)
    sources = load_sources(config)
    examples, counts = mix_sources(sources, config.seed)
    if not examples:
        raise UsageError("no training examples left after reading the inputs (are all revisions flagged?)")

    trainer, tokenizer, truncated, template = prepare(config, model_name, examples)
    warn_cut_examples(truncated, len(examples), "examples", config.max_length)
    checkpoint = _checkpoint_to_resume(config, out)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its logs; stdout stays for records
        trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start

    history = [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]
    steps = trainer.state.global_step
    metrics = {
        "examples": len(examples),
        "examples_per_source": counts,
        "truncated_examples": truncated,
        "steps": steps,
        "train_loss_first": history[0]["loss"] if history else None,
        "train_loss_last": history[-1]["loss"] if history else None,
        "loss_history": history,
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(steps, 1), 4),
    }
    # Full model, LoRA adapter, or (--merge) the merged model with its adapter beside it in adapter/.
    save_model(trainer.model, tokenizer, out, merge=config.lora and config.merge, adapter=config.lora and config.merge,
               trainer=trainer)
    leave_process_group()
    if not is_main():  # the main process writes caictl.json and the summary
        return metrics
    write_model_info(out, "sft", {"base_model": model_name}, inputs=config.revisions + [s[0] for s in sources[1:]],
                     options=config, extra={"chat_template": template,
                                            "precision": precision(config.pure_bf16, config.lora).label},
                     metrics=metrics)
    plot_loss(history, out / "loss.png")
    summary_table("sft", [("out", out), ("examples", f"{len(examples)} {counts}"), ("steps", steps),
                          ("loss first -> last", (metrics["train_loss_first"], metrics["train_loss_last"])),
                          ("seconds per step", metrics["seconds_per_step"])])
    return metrics


# Data ---------------------------------------------------------------------------------------------------


def load_sources(config: SFTConfig) -> list[tuple[str, float, list[list[dict]]]]:
    """(name, weight, conversations) per source: the main input first, then each --mix file. Both read the same
    rows: revise records train on their revisions, chat rows as they are."""
    revisions = []
    for path in config.revisions:
        for row in read_rows(path):
            revisions += training_conversations(row, config.revisions_mode)
    sources = [("revisions", config.revisions_weight, revisions)]
    for spec in config.mix:
        path, weight = (spec.rsplit(":", 1)[0], float(spec.rsplit(":", 1)[1])) if _has_weight(spec) else (spec, 1.0)
        rows = [conversation for row in read_rows(path)
                for conversation in training_conversations(row, config.revisions_mode)]
        sources.append((path, weight, rows))
    return sources


def training_conversations(row, mode: str) -> list[list[dict]]:
    """Training conversations from one row: a revise record (caictl's, `--format hf`, Anthropic's SL-CAI samples)
    gives its final revision, or with mode "all" every usable round's revision; any other row is chat data."""
    try:
        revised = to_revision(row.data)
    except ValueError as error:
        raise InputError(f"{row.where}: {error}")
    if revised is None:
        return [chat_conversation(row)]
    if mode == "final":
        replies = [revised.response] if revised.response else []
    else:
        replies = revised.revisions
    return [revised.messages + [{"role": "assistant", "content": reply}] for reply in replies]


def chat_conversation(row) -> list[dict]:
    """A chat row as messages: `messages`, `prompt` + `completion`, an hh-rlhf `chosen` transcript, or a
    `caictl sample` record (its first response)."""
    data = row.data
    if isinstance(data, dict) and isinstance(data.get("messages"), list) and data.get("responses"):
        messages = data["messages"] + [{"role": "assistant", "content": data["responses"][0]}]
    elif isinstance(data, dict) and isinstance(data.get("messages"), list):
        messages = data["messages"]
    elif isinstance(data, dict) and "prompt" in data and "completion" in data:
        prompt, completion = data["prompt"], data["completion"]
        prompt = prompt_from_text(prompt) if isinstance(prompt, str) else prompt
        # A completion written to follow "Assistant:" starts with a space that is no part of the answer.
        completion = [{"role": "assistant", "content": completion.strip()}] if isinstance(completion, str) \
            else completion
        messages = prompt + completion
    elif isinstance(data, dict) and isinstance(data.get("chosen"), str):
        messages = parse_transcript(data["chosen"])
    else:
        raise InputError(f"{row.where}: not training data: expected revise output, 'messages', 'prompt' + "
                         "'completion', an hh-rlhf 'chosen', or 'messages' + 'responses' (caictl sample)")
    if not messages or messages[-1].get("role") != "assistant":
        raise InputError(f"{row.where}: the conversation must end with an assistant message to train on")
    return messages


def mix_sources(sources, seed: int) -> tuple[list[list[dict]], dict]:
    """Every revision once; each other source sampled so that its share of the set is weight / total weight
    (drawn without replacement while it has enough rows, then cycled)."""
    rng = random.Random(seed)
    (_, revision_weight, revisions), others = sources[0], sources[1:]
    total_weight = revision_weight + sum(weight for _, weight, _ in others)
    size = len(revisions) * total_weight / revision_weight
    examples, counts = list(revisions), {"revisions": len(revisions)}
    for name, weight, rows in others:
        wanted = round(size * weight / total_weight)
        if not rows or not wanted:
            counts[name] = 0
            continue
        order = rows[:]
        rng.shuffle(order)
        picked = [order[i % len(order)] for i in range(wanted)]
        examples += picked
        counts[name] = len(picked)
    rng.shuffle(examples)
    return examples, counts


# Training -----------------------------------------------------------------------------------------------


def prepare(config: SFTConfig, model_name: str, examples: list[list[dict]]):
    """The TRL trainer, ready to train; also the tokenizer, how many examples exceed --max-length, and which chat
    templates were trained with and saved (for caictl.json)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
    except OSError as error:
        raise UsageError(f"cannot load model {model_name!r} ({str(error).splitlines()[0]})")
    training, source = training_template(tokenizer, model_name, config.chat_template)
    # The output keeps the model's own template, so users get their family's back; a model without one keeps
    # the template it was trained with (its markers change nothing when rendering).
    saved_from = "base model" if tokenizer.chat_template else "--chat-template"
    if not tokenizer.chat_template:
        tokenizer.chat_template = training
    template = {"training": source,
                "saved": {"from": saved_from, "sha256": template_sha256(chat_template_text(tokenizer.chat_template))}}
    log(f"training chat template: {describe_template(source)}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = tokenize(examples, tokenizer, training, source)
    truncated = sum(len(row["input_ids"]) > config.max_length for row in rows)

    micro = micro_batch(config.batch_size, config.micro_batch_size)
    chosen = precision(config.pure_bf16, config.lora)
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=chosen.load)
    learning_rate = config.learning_rate or (2e-4 if config.lora else 2e-5)
    args = TRLSFTConfig(
        output_dir=str(Path(config.out) / "checkpoints"),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=learning_rate,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup_steps,
        # A step of batch_size, shared among the processes, in micro-batches: transformers normalises accumulated
        # losses by the step's token count over all processes, so the update equals the whole batch's.
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=config.grad_accum * (per_process(config.batch_size) // micro),
        max_length=config.max_length,
        # The rows come tokenized with their labels (chat_training.tokenize), so TRL neither swaps templates nor masks;
        # it still cuts rows at max_length and drops any left without a trained token.
        assistant_only_loss=False,
        seed=config.seed,
        data_seed=config.seed,
        **trl_device_args(TRLSFTConfig, chosen),
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        report_to="none",
        dataset_num_proc=None,
        **console_args(),
    )
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        target = config.lora_target if config.lora_target == "all-linear" else config.lora_target.split(",")
        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                 target_modules=target, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config)
    trainer_progress(trainer, "sft")
    return trainer, tokenizer, truncated, template


def _checkpoint_to_resume(config: SFTConfig, out: Path) -> str | None:
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if config.resume and not checkpoints:
        raise UsageError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    if checkpoints:
        log(f"resuming from {checkpoints[-1]}")
        return str(checkpoints[-1])
    return None


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([h["step"] for h in history], [h["loss"] for h in history])
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (assistant tokens)")
    axis.set_title("caictl sft")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
