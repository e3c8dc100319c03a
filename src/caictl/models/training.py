"""What the training stages (sft, train-pm, ppo, dpo) share: the output folder, the device settings, how a
step's batch is split among processes (torchrun / accelerate launch), caictl's progress bar for TRL's trainers,
and how a trained model is saved and described (caictl.json)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from caictl import __version__
from caictl.data.reading import file_hash
from caictl.errors import UsageError
from caictl.models.processes import is_main, world_size
from caictl.ui import figure, log, meter, verbose


def output_folder(out: str | Path, overwrite: bool) -> Path:
    """OUT, refused when it already holds a finished model (caictl.json) unless --overwrite clears it."""
    out = Path(out)
    if (out / "caictl.json").exists() and not overwrite:
        raise UsageError(f"{out} already holds a trained model; pass --overwrite to train again, or -o elsewhere")
    # The other processes of a several-process run leave the removal to the main one. They look into OUT again
    # only after the trainer has set up the process group, which waits for every process, so it is done by then.
    if overwrite and out.exists() and is_main():
        shutil.rmtree(out)
    return out


def batch_split_problem(batch_size: int) -> str | None:
    """--batch-size is the global batch of one optimizer step: each of the processes takes an equal share."""
    processes = world_size()
    if batch_size % processes:
        return (f"--batch-size {batch_size} is the batch of a whole step, shared by the {processes} processes: "
                f"give a multiple of {processes}")
    return None


def per_process(batch_size: int) -> int:
    """This process's share of a step's batch (checked by batch_split_problem)."""
    return batch_size // world_size()


def trl_device_args(trl_config_class) -> tuple[dict, object]:
    """Keyword arguments for a TRL config on this machine, and the dtype to load the model in.

    TRL defaults to bf16 and activation checkpointing: on a CPU the first fails and the second costs ~40%.
    transformers 5 renamed gradient_checkpointing to activation_checkpointing; use whichever is there.
    Under DDP the Trainer would look for unused parameters after every backward pass (as it does whenever
    checkpointing is off); every parameter of these models takes part in each forward pass."""
    import torch

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    fields = trl_config_class.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return ({"use_cpu": not cuda, "bf16": bf16, checkpointing: False, "ddp_find_unused_parameters": False},
            torch.bfloat16 if bf16 else torch.float32)


def micro_batch(batch_size: int, requested: int | None) -> int:
    """Sequences per forward pass within this process's share of a step of batch_size. Default: the whole share
    on a GPU, one on a CPU, where padding to the longest row and the larger attention matrices cost more than
    batching saves (benchmarks/bench_train.py measures it); the step, and so the update, is the same either way."""
    import torch

    share = per_process(batch_size)
    micro = requested or (share if torch.cuda.is_available() else 1)
    if micro < 1 or share % micro:
        where = f" (each of the {world_size()} processes takes {share})" if world_size() > 1 else ""
        raise UsageError(f"--micro-batch-size {micro} must divide --batch-size {batch_size}{where}")
    return micro


def warn_cut_examples(cut: int, total: int, what: str, max_length: int) -> None:
    """One warning for training examples cut to --max-length (sft cuts the end, train-pm the front)."""
    if cut:
        log(f"warning: {cut} of {total} {what} are longer than --max-length {max_length} tokens and were cut; "
            "raise --max-length to keep them whole (caictl.json counts them in metrics.truncated_examples)")


def trainer_progress(trainer, description: str) -> None:
    """Show caictl's progress bar for a transformers / TRL trainer in place of the trainer's own tqdm bar and
    printed log dicts, which would interleave with caictl's lines: step / total, the latest loss, steps/s and the
    time left, then one line with the loss first -> last. Under `caictl -v` the trainer keeps its own (the
    trainer's args then hold disable_tqdm=False: see console_args)."""
    if verbose():
        return
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_progress_callback(description))


def console_args() -> dict:
    """Keyword arguments for a TRL config: its tqdm bar only under `caictl -v` (trainer_progress shows caictl's)."""
    return {"disable_tqdm": not verbose()}


def _progress_callback(description: str):
    # transformers is imported here, not at the top: `caictl --help` imports this module through the stages.
    from transformers import TrainerCallback

    class CaictlProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.losses = []
            self.started, self.first_step = time.perf_counter(), state.global_step
            # The bar is entered here and left in on_train_end: the trainer, not a with block, spans the run.
            self.bar = meter(state.max_steps, description, unit="steps", done=state.global_step)
            self.meter = self.bar.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            self.meter.advance(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])
                self.meter.set_note(f"loss {figure(float(logs['loss']))}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.__exit__(None, None, None)
            steps = state.global_step - self.first_step
            seconds = time.perf_counter() - self.started
            loss = f", loss {figure(float(self.losses[0]))} -> {figure(float(self.losses[-1]))}" if self.losses else ""
            log(f"{description}: {steps} steps in {seconds:.1f}s ({steps / max(seconds, 1e-9):.2f} steps/s){loss}")

    return CaictlProgress()


def save_model(model, tokenizer, out: Path, *, merge: bool = False, adapter: bool = False, trainer=None) -> None:
    """Write a trained model and its tokenizer to OUT, which then loads with from_pretrained.

    merge: the model is a LoRA (peft) model, written merged into its base; adapter: the adapter itself, with the
    tokenizer, also goes to OUT/adapter. trainer: a transformers Trainer that trained the model; every process
    must then call this, as trainer.save_model gathers the shards from all of them under FSDP or ZeRO-3 (it
    writes the model whole, or an unmerged LoRA model's adapter alone), and the trainer's checkpoints are removed
    once the model is written: training finished, nothing is left to resume. Otherwise the main process alone
    writes."""
    if trainer is not None and not merge:
        trainer.save_model(str(out))
    if not is_main():
        return
    out.mkdir(parents=True, exist_ok=True)
    if merge or trainer is None:
        if adapter:
            model.save_pretrained(out / "adapter")
            tokenizer.save_pretrained(out / "adapter")
        (model.merge_and_unload() if merge else model).save_pretrained(out)
    tokenizer.save_pretrained(out)
    if trainer is not None:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)


def write_model_info(out: Path, stage: str, about: dict, *, inputs: list | None = None, options=None,
                     extra: dict | None = None, metrics: dict | None = None, processes: bool = True) -> dict:
    """OUT/caictl.json, which says what made the model beside it; returns what it wrote.

    In order: the stage and caictl's version; with processes, how many processes trained (world_size); about:
    the stage's own opening fields (the model it started from, or what init-model built); inputs: the input
    files, each with its SHA-256; options: the stage's config dataclass, every field; extra: fields the stage
    adds after them; metrics. Write it last, once the model is saved: its presence marks a finished run, which
    output_folder refuses to train over, and a run killed before it leaves a folder that is not taken for one."""
    info = {"stage": stage, "caictl_version": __version__}
    if processes:
        info["world_size"] = world_size()
    info.update(about)
    if inputs is not None:
        info["inputs"] = [{"path": str(path), "sha256": file_hash(path)} for path in inputs]
    if options is not None:
        info["options"] = asdict(options)
    info.update(extra or {})
    if metrics is not None:
        info["metrics"] = metrics
    (Path(out) / "caictl.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
