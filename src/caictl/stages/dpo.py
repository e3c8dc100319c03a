r"""dpo: direct preference optimisation of the policy on AI preference labels, on TRL's DPOTrainer.

    caictl dpo prefs.jsonl --model models/sl-cai -o models/rl-cai-dpo \
        --beta 0.1

The alternative to train-pm + ppo that Hugging Face's open CAI recipe used. Reads label output (and plain
prompt/chosen/rejected rows) as they are. TRL's DPO takes no per-example target, so soft labels are used in
two ways only: pairs whose p_chosen is below --min-p-chosen are left out (the feedback model could not tell
them apart), and --label-smoothing applies one global conservative-DPO smoothing to all pairs.
caictl tokenizes the pairs itself, as sft tokenizes a chat (caictl.models.chat_training.preference_rows): message
content is data (a "<|eot_id|>" written in a response is text, as the engines read it), and each response trains
on its content and the end-of-turn token that closes it; `caictl inspect --stage dpo` shows those rows.
Several processes: `torchrun --nproc_per_node N -m caictl dpo ...` or `accelerate launch --num_processes N -m caictl
dpo ...`; --batch-size is the whole step's batch, each process taking an equal share.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from caictl import settings
from caictl.data.conversation import prompt_from_text
from caictl.data.reading import read_rows
from caictl.errors import InputError, UsageError
from caictl.models import kind as model_kind
from caictl.models.chat_training import describe_template, preference_rows, training_template
from caictl.models.processes import is_main, leave_process_group
from caictl.models.training import (
    batch_split_problem,
    console_args,
    output_folder,
    per_process,
    precision,
    precision_problem,
    pure_bf16_option,
    save_model,
    trainer_progress,
    trl_device_args,
    write_model_info,
)
from caictl.options import INPUT_OUTPUT, LORA, METHOD, MODEL_ENGINE, RUNS, TRAINING, common, option
from caictl.ui import log, quiet_transformers, summary_table


@dataclass
class DPOConfig:
    prefs: list[str] = option(help="Preference files (caictl label output, or prompt/chosen/rejected rows).",
                              panel=INPUT_OUTPUT, argument=True)
    out: str = option(help="Output model folder.", panel=INPUT_OUTPUT, short="-o")
    model: str | None = option(
        None, "The policy to optimise, also the frozen reference: a folder or hub id; unset: CAICTL_MODEL, else "
        "`model:` in caictl.yaml.",
        MODEL_ENGINE)
    beta: float = option(0.1, "DPO beta: how far from the reference the policy may move.", METHOD)
    label_smoothing: float = option(
        0.0, "Conservative DPO smoothing for all pairs (TRL has no per-pair target: p_chosen is not a target).",
        METHOD)
    min_p_chosen: float = option(0.5, "Leave out pairs whose soft label p_chosen is below this.", METHOD)
    epochs: float = option(1.0, "Passes over the pairs.", TRAINING)
    max_steps: int = option(-1, "Stop after N optimizer steps; > 0 overrides --epochs.", TRAINING)
    learning_rate: float = option(5e-7, "Learning rate.", TRAINING)
    batch_size: int = option(4, "Pairs per optimizer step, over all processes.", TRAINING)
    grad_accum: int = option(1, "Gradient accumulation steps.", TRAINING)
    max_length: int = option(1024, "Tokens per prompt + response.", TRAINING)
    chat_template: str | None = option(
        None, "Jinja chat template with {% generation %} markers to train with (the output keeps the model's own "
        "template).", TRAINING)
    pure_bf16: bool = pure_bf16_option()
    lora: bool = option(False, "LoRA (the reference is the base with the adapter off); saved merged.", LORA)
    lora_r: int = option(16, "LoRA rank.", LORA)
    lora_alpha: int = option(32, "LoRA alpha.", LORA)
    save_steps: int = option(100, "Checkpoint every N optimizer steps (a re-run resumes).", RUNS)
    seed: int = common("seed", 0)
    overwrite: bool = option(False, "Replace an earlier model in OUT.", RUNS)

    def check(self) -> None:
        problems = []
        for path in self.prefs:
            if not Path(path).exists():
                problems.append(f"{path}: no such file")
        if not self.prefs:
            problems.append("give at least one preference file (output of `caictl label`)")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5 or not 0.5 <= self.min_p_chosen <= 1:
            problems.append("--beta > 0, --label-smoothing in [0, 0.5) and --min-p-chosen in [0.5, 1]")
        if batch_split_problem(self.batch_size):
            problems.append(batch_split_problem(self.batch_size))
        if precision_problem(self.pure_bf16, self.lora):
            problems.append(precision_problem(self.pure_bf16, self.lora))
        if self.chat_template and not Path(self.chat_template).is_file():
            problems.append(f"--chat-template {self.chat_template}: no such file")
        if problems:
            raise UsageError("; ".join(problems))


def run(config: DPOConfig) -> dict:
    config.check()
    model_name = settings.require_model(config.model)
    model_kind.check(model_name, model_kind.CAUSAL_LM, "--model")
    out = output_folder(config.out, config.overwrite)
    rows, dropped = read_pairs(config)
    if not rows:
        raise UsageError(f"no pairs left to train on ({dropped} below --min-p-chosen {config.min_p_chosen})")
    trainer, template = prepare(config, model_name, rows)
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if checkpoints:
        log(f"resuming from {checkpoints[-1]}")
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    seconds = time.perf_counter() - start
    logs = [e for e in trainer.state.log_history if "loss" in e]
    history = [{"step": e["step"], "loss": e["loss"], "margin": e.get("rewards/margins"),
                "accuracy": e.get("rewards/accuracies")} for e in logs]
    metrics = {"pairs": len(rows), "dropped_below_min_p": dropped, "steps": trainer.state.global_step,
               "seconds": round(seconds, 2), "history": history,
               "margin_first": history[0]["margin"] if history else None,
               "margin_last": history[-1]["margin"] if history else None}
    save_model(trainer.model, trainer.processing_class, out, merge=config.lora, trainer=trainer)
    leave_process_group()
    if not is_main():  # the main process writes caictl.json and the summary
        return metrics
    write_model_info(out, "dpo", {"base_model": model_name}, inputs=config.prefs, options=config,
                     extra={"precision": precision(config.pure_bf16, config.lora).label,
                            "chat_template": {"training": template}},
                     metrics=metrics)
    summary_table("dpo", [("out", out), ("pairs", f"{len(rows)} ({dropped} dropped)"),
                          ("steps", metrics["steps"]),
                          ("reward margin first -> last", (metrics["margin_first"], metrics["margin_last"]))])
    return metrics


def read_pairs(config: DPOConfig) -> tuple[list[dict], int]:
    rows, dropped = [], 0
    for path in config.prefs:
        for row in read_rows(path):
            data = row.data
            if not isinstance(data, dict) or not {"prompt", "chosen", "rejected"} <= set(data):
                raise InputError(f"{row.where}: a preference row needs prompt, chosen and rejected "
                                 "(run `caictl label` first)")
            if data.get("p_chosen", 1.0) < config.min_p_chosen:
                dropped += 1
                continue
            prompt = data["prompt"]
            prompt = prompt_from_text(prompt) if isinstance(prompt, str) else list(prompt)
            chosen, rejected = as_messages(data["chosen"]), as_messages(data["rejected"])
            # The completion is each side's last message, the assistant's answer; what comes before it is prompt,
            # and must then be the same on both sides.
            if not (chosen and rejected and chosen[-1].get("role") == rejected[-1].get("role") == "assistant"):
                raise InputError(f"{row.where}: chosen and rejected must each end on an assistant message")
            if chosen[:-1] != rejected[:-1]:
                raise InputError(f"{row.where}: chosen and rejected differ before their last message; a pair "
                                 "answers one prompt")
            rows.append({"prompt": prompt + chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]})
    return rows, dropped


def as_messages(value) -> list[dict]:
    return [{"role": "assistant", "content": value}] if isinstance(value, str) else list(value)


def tokenize_pairs(pairs: list[dict], tokenizer, model_name: str, chat_template: str | None):
    """The rows DPO trains on (prompt_ids, chosen_ids, rejected_ids), the training template and where it came from."""
    template, source = training_template(tokenizer, model_name, chat_template)
    return preference_rows(pairs, tokenizer, template, source), template, source


def prepare(config: DPOConfig, model_name: str, pairs: list[dict]):
    """The TRL trainer on the tokenized pairs, ready to train, and where its training chat template came from."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
    except OSError as error:
        raise UsageError(f"cannot load model {model_name!r} ({str(error).splitlines()[0]})")
    rows, _, source = tokenize_pairs(pairs, tokenizer, model_name, config.chat_template)
    log(f"training chat template: {describe_template(source)}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    chosen = precision(config.pure_bf16, config.lora)
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=chosen.load)
    args = TRLDPOConfig(
        output_dir=str(Path(config.out) / "checkpoints"), beta=config.beta, label_smoothing=config.label_smoothing,
        num_train_epochs=config.epochs, max_steps=config.max_steps, learning_rate=config.learning_rate,
        per_device_train_batch_size=per_process(config.batch_size), gradient_accumulation_steps=config.grad_accum,
        max_length=config.max_length, seed=config.seed, **trl_device_args(TRLDPOConfig, chosen),
        logging_steps=1, save_strategy="steps", save_steps=config.save_steps, save_total_limit=2, report_to="none",
        **console_args(),
    )
    peft_config, reference = None, None
    if config.lora:  # the reference is the policy with its adapter switched off
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    else:
        # Loaded here rather than by TRL, which would load it like the policy: it never trains, so it is held as
        # frozen weights are (bf16 on a GPU), not in the policy's fp32.
        reference = AutoModelForCausalLM.from_pretrained(model_name, dtype=chosen.frozen)
    trainer = pretokenized(DPOTrainer)(model=model, ref_model=reference, args=args,
                                       train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                       peft_config=peft_config)
    trainer_progress(trainer, "dpo")
    return trainer, source


@functools.cache
def pretokenized(base):
    """TRL's DPOTrainer (base) on rows caictl tokenized (preference_rows). TRL 1.16 takes no tokenized preference rows
    (its _prepare_dataset always renders and tokenizes prompt/chosen/rejected, control tokens in content parsed as
    control tokens), so that one method is replaced. A subclass rather than a tokenizer wrapper: TRL requires a real
    PreTrainedTokenizerBase (it pads, saves and decodes with it), and only this method turns text into ids.
    tests/test_trl_content.py fails if TRL changes this method's signature or stops calling it."""

    class PretokenizedDPOTrainer(base):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # As TRL does after tokenizing: a prompt that fills max_length would leave keep_start truncation no
            # completion token to train on.
            if args.max_length is not None and args.truncation_mode == "keep_start":
                dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)
            return dataset

    return PretokenizedDPOTrainer
