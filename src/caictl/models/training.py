"""What the training stages (sft, train-pm, ppo, dpo) share: the output folder, the device settings and the
precision (fp32 master weights, bf16 compute on a GPU), how a step's batch is split among processes (torchrun /
accelerate launch), caictl's progress bar for TRL's trainers, and how a trained model is saved and described
(caictl.json)."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from caictl import __version__
from caictl.data.reading import file_hash
from caictl.errors import UsageError
from caictl.models.processes import is_main, world_size
from caictl.options import TRAINING, option
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


def pure_bf16_option():
    """The --pure-bf16 field of a training stage's config (sft, dpo, train-pm, ppo), its help written once."""
    return option(False, "Train bf16 weights (half the memory) instead of fp32 master weights under bf16 "
                         "autocast; updates under half a bf16 step, most at small learning rates, then round away. "
                         "Needs a GPU with bf16; not with --lora.", TRAINING)


@dataclass(frozen=True)
class Precision:
    """How a training stage holds its weights and computes with them (chosen by precision()).

    load: the dtype the model that trains is loaded in; frozen: the dtype of weights that never train (caictl's
    PPO reference), which is also the dtype the hf engine runs a model in; autocast: the dtype forward passes
    compute in under torch.autocast (TRL: bf16=True), None for the weights' own; label: caictl.json's
    "precision". LoRA's adapters, and any head trained with them, stay fp32 whatever the base is loaded in."""

    load: object  # torch.dtype; torch is imported only when a stage runs
    frozen: object
    autocast: object | None
    label: str

    def autocast_on(self, device: str):
        """A context in which forward passes on `device` compute as this precision says."""
        import torch

        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=self.autocast)


def bf16_gpu() -> bool:
    """Whether training runs on a CUDA GPU that computes in bf16 (Ampere and newer)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def precision_problem(pure_bf16: bool, lora: bool) -> str | None:
    """What is wrong with --pure-bf16 here, for a config's check(); None when nothing is."""
    if pure_bf16 and lora:
        return ("--pure-bf16 applies to full fine-tuning: with --lora the frozen base is bf16 on a GPU already and "
                "the adapters train in fp32")
    if pure_bf16 and not bf16_gpu():
        return "--pure-bf16 needs a CUDA GPU with bf16 (Ampere or newer); leave it out to train in fp32"
    return None


def precision(pure_bf16: bool = False, lora: bool = False) -> Precision:
    """The precision every training stage uses on this machine.

    On a GPU with bf16, full fine-tuning loads fp32 master weights and computes under bf16 autocast: AdamW's step
    (about the learning rate, 1e-5 say) is under half a bf16 step for any weight above ~0.004 in size, so updating
    bf16 weights directly rounds most of it away. pure_bf16 does that anyway, for half the memory. LoRA loads the
    frozen base in bf16 and trains fp32 adapters under bf16 autocast. Elsewhere (a CPU, a GPU without bf16)
    everything is fp32; pure_bf16 is then a UsageError, as it is with LoRA."""
    import torch

    if problem := precision_problem(pure_bf16, lora):
        raise UsageError(problem)
    if not bf16_gpu():
        return Precision(torch.float32, torch.float32, None, "fp32")
    if lora:
        return Precision(torch.bfloat16, torch.bfloat16, torch.bfloat16, "bf16 base, fp32 LoRA, bf16 autocast")
    if pure_bf16:
        return Precision(torch.bfloat16, torch.bfloat16, torch.bfloat16, "bf16")
    return Precision(torch.float32, torch.bfloat16, torch.bfloat16, "fp32 master, bf16 autocast")


def release_memory() -> None:
    """Returns the memory of objects just dropped (a trainer, an optimizer's state) before more is loaded: Python
    frees cycles only when it collects, and torch keeps freed GPU blocks for itself until told."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trl_device_args(trl_config_class, chosen: Precision) -> dict:
    """Keyword arguments for a TRL config on this machine, for a model held as `chosen` says.

    TRL defaults to bf16 and activation checkpointing: on a CPU the first fails and the second costs ~40%. TRL's
    bf16 is autocast: it leaves the loaded model's dtype alone. transformers 5 renamed gradient_checkpointing to
    activation_checkpointing; use whichever is there. Under DDP the Trainer would look for unused parameters after
    every backward pass (as it does whenever checkpointing is off); every parameter of these models takes part in
    each forward pass."""
    import torch

    fields = trl_config_class.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {"use_cpu": not torch.cuda.is_available(), "bf16": chosen.autocast is not None, checkpointing: False,
            "ddp_find_unused_parameters": False}


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


def save_model(model, tokenizer, out: Path, *, merge: bool = False, adapter: bool = False, trainer=None):
    """Write a trained model and its tokenizer to OUT, which then loads with from_pretrained; return the model as
    written (with merge, the merged model; merging changes `model` in place).

    merge: the model is a LoRA (peft) model, written merged into its base; adapter: the adapter itself, with the
    tokenizer, also goes to OUT/adapter. trainer: a transformers Trainer that trained the model; every process
    must then call this, as trainer.save_model gathers the shards from all of them under FSDP or ZeRO-3 (it
    writes the model whole, or an unmerged LoRA model's adapter alone), and the trainer's checkpoints are removed
    once the model is written: training finished, nothing is left to resume. Otherwise the main process alone
    writes."""
    if trainer is not None and not merge:
        trainer.save_model(str(out))
    if not is_main():
        return model
    out.mkdir(parents=True, exist_ok=True)
    if merge or trainer is None:
        if adapter:
            model.save_pretrained(out / "adapter")
            tokenizer.save_pretrained(out / "adapter")
        model = model.merge_and_unload() if merge else model
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if trainer is not None:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return model


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
