"""What the training stages (sft, train-pm, ppo, dpo) share: the output folder and the device settings."""

from __future__ import annotations

import shutil
from pathlib import Path

from caictl.errors import UsageError
from caictl.ui import log


def output_folder(out: str | Path, overwrite: bool) -> Path:
    """OUT, refused when it already holds a finished model (caictl.json) unless --overwrite clears it."""
    out = Path(out)
    if (out / "caictl.json").exists() and not overwrite:
        raise UsageError(f"{out} already holds a trained model; pass --overwrite to train again, or -o elsewhere")
    if overwrite and out.exists():
        shutil.rmtree(out)
    return out


def trl_device_args(trl_config_class) -> tuple[dict, object]:
    """Keyword arguments for a TRL config on this machine, and the dtype to load the model in.

    TRL defaults to bf16 and activation checkpointing: on a CPU the first fails and the second costs ~40%.
    transformers 5 renamed gradient_checkpointing to activation_checkpointing; use whichever is there."""
    import torch

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    fields = trl_config_class.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {"use_cpu": not cuda, "bf16": bf16, checkpointing: False}, (torch.bfloat16 if bf16 else torch.float32)


def micro_batch(batch_size: int, requested: int | None) -> int:
    """Sequences per forward pass within a step of batch_size. Default: the whole batch on a GPU, one on a CPU,
    where padding to the longest row and the larger attention matrices cost more than batching saves
    (benchmarks/bench_train.py measures it); the step, and so the update, is the same either way."""
    import torch

    micro = requested or (batch_size if torch.cuda.is_available() else 1)
    if micro < 1 or batch_size % micro:
        raise UsageError(f"--micro-batch-size {micro} must divide --batch-size {batch_size}")
    return micro


def warn_cut_examples(cut: int, total: int, what: str, max_length: int) -> None:
    """One warning for training examples cut to --max-length (sft cuts the end, train-pm the front)."""
    if cut:
        log(f"warning: {cut} of {total} {what} are longer than --max-length {max_length} tokens and were cut; "
            "raise --max-length to keep them whole (caictl.json counts them in metrics.truncated_examples)")
