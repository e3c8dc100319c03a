"""train-pm's per-epoch evaluation under several processes: its seconds with two CPU processes against one.

    python benchmarks/bench_pm_eval.py --pairs 600 --rounds 3

Each round trains the same tiny PM twice, alternating which goes first: once as one process and once as two under
torchrun (one thread each), with `--select-on` a file of --pairs comparisons measured after each of 2 epochs.
Prints one JSON object: both sides' `metrics.eval_seconds` per round, and the median of the per-round ratios
(one process / two) with its min and max. Two processes share the pairs, so the ratio approaches 2; were every
process to score every pair, it would stay near 1. Both sides' selection accuracy and loss are printed too: they
should be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from caictl.stages import init_model as tiny

ANSWERS = ["I can't help with that, but here is a safer way.", "No. That would hurt someone.",
           "Here is a safe, legal alternative."]


def pairs(count: int) -> list[dict]:
    return [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"Question {i}: how do I do it? "
                                        + "more words " * (i % 20)}],
             "chosen": [{"role": "assistant", "content": ANSWERS[i % 3]}],
             "rejected": [{"role": "assistant", "content": "Sure, here is exactly how."}],
             "p_chosen": [0.6, 0.75, 0.9][i % 3]} for i in range(count)]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(processes: int, model: Path, prefs: Path, select: Path, out: Path) -> dict:
    launch = (["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port())]
              if processes > 1 else [])
    command = [sys.executable, *launch, "-m", "caictl", "train-pm", str(prefs), "--model", str(model),
               "--select-on", str(select), "--epochs", "2", "--patience", "0", "--batch-size", "6",
               "--max-length", "64", "-o", str(out)]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = json.loads((out / "caictl.json").read_text())["metrics"]
    return {"eval_seconds": metrics["eval_seconds"], "selection": metrics["curve"][-1]["eval"][str(select)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model = tiny.run(tiny.InitModelConfig(out=folder / "base", preset="tiny", task="seq-cls", seed=1))
        prefs, select = write(folder / "prefs.jsonl", pairs(24)), write(folder / "select.jsonl", pairs(args.pairs))
        rounds = []
        for k in range(args.rounds):
            order = (1, 2) if k % 2 == 0 else (2, 1)
            measured = {n: train(n, model, prefs, select, folder / f"pm-{k}-{n}") for n in order}
            rounds.append(measured)
        ratios = [r[1]["eval_seconds"] / r[2]["eval_seconds"] for r in rounds]
        print(json.dumps({"pairs": args.pairs, "rounds": [{str(n): r[n] for n in (1, 2)} for r in rounds],
                          "ratio": round(statistics.median(ratios), 2),
                          "ratio_min": round(min(ratios), 2), "ratio_max": round(max(ratios), 2)}, indent=1))


if __name__ == "__main__":
    main()
