"""Which process this is. The training stages (sft, train-pm, dpo, ppo --algo rloo|grpo) also run as several
processes under `torchrun` or `accelerate launch`, one model replica each; both launchers set RANK and
WORLD_SIZE. A plain run is process 0 of 1. Read from the environment, not from torch.distributed, so that it
is known before any model loads (and `caictl --help` stays free of torch)."""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Only the main process writes the output folder, logs, plots and progress."""
    return rank() == 0


def leave_process_group() -> None:
    """Every process calls this once its last collective (saving the model) is done. A process that exits with
    its gloo group still alive can abort as the interpreter shuts down (its worker threads outlive Python), and
    the main process goes on alone (held-out reward, reports) while the others exit."""
    import sys

    distributed = sys.modules.get("torch.distributed")  # no torch import for a stage that never loaded it
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.barrier()
        distributed.destroy_process_group()
