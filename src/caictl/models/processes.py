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
