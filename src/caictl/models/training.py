"""What the training stages (sft, train-pm, ppo, dpo) share: the output folder, the device settings, and how a
step's batch is split among processes (torchrun / accelerate launch)."""

from __future__ import annotations

import shutil
from pathlib import Path

from caictl.errors import UsageError
from caictl.models.processes import is_main, world_size
from caictl.ui import log


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
