"""How well `caictl train-pm --model minilm` generalises to unseen human pairs, and what it costs, by epochs,
--max-length and epoch selection.

    OMP_NUM_THREADS=1 python benchmarks/pm_generalisation.py shared/data/hh-rlhf/harmless-base-test.part-a.jsonl.gz

The file's hh-rlhf rows are shuffled with a fixed seed and split three ways: train (1,200), selection (150: the
`--select-on` set that chooses the epoch) and test (150: `--eval`, reported, never used to choose). The data
stays where it is; the split files go to --work, outside the repository.

Per --max-length one `caictl train-pm` run of --epochs epochs with selection and --patience 0 (every epoch runs)
gives every row of the table: with the constant learning rate (the default) and a fixed seed, a run of fewer
epochs takes exactly the same steps as the first epochs of a longer one, and evaluation does not touch the
weights or the random streams. So "k epochs, no selection" is epoch k of the curve, and "k epochs, selection" is
the best epoch by selection accuracy among the first k. Minutes are training time through that epoch (the
per-epoch evaluations apart; selection rows add the selection set's evaluations, shown separately). --check
also runs the first row on its own, to confirm that it equals epoch 1 of the long run.
Prints one JSON line per row, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from caictl.data.reading import read_rows


def split(path: str, work: Path, sizes: tuple[int, int, int], seed: int) -> dict[str, Path]:
    rows = [row.data for row in read_rows(path)]
    if len(rows) < sum(sizes):
        raise SystemExit(f"{path}: {len(rows)} rows, fewer than the {sum(sizes)} asked for")
    random.Random(seed).shuffle(rows)
    files, first = {}, 0
    for name, size in zip(("train", "select", "test"), sizes):
        files[name] = work / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows[first:first + size]))
        first += size
    return files


def train(files: dict[str, Path], out: Path, max_length: int, epochs: int, select: bool, seed: int) -> dict:
    selection = ["--select-on", files["select"], "--patience", "0"] if select else ["--no-select-best"]
    command = [sys.executable, "-m", "caictl", "train-pm", files["train"], "--model", "minilm", "-o", out,
               "--eval", files["test"], "--max-length", max_length, "--epochs", epochs, "--seed", seed,
               "--overwrite", *selection]
    subprocess.run([str(part) for part in command], check=True)
    return json.loads((out / "caictl.json").read_text())["metrics"]


def rows_of(metrics: dict, files: dict[str, Path], max_length: int) -> list[dict]:
    curve, select, test = metrics["curve"], str(files["select"]), str(files["test"])
    # Evaluation seconds per epoch, split between the two sets by their pairs (both are 150 by default).
    per_epoch_eval = metrics["eval_seconds"] / len(curve)
    select_share = metrics["eval"][select]["comparisons"] / (metrics["eval"][select]["comparisons"]
                                                            + metrics["eval"][test]["comparisons"])
    rows = []
    for k in range(1, len(curve) + 1):
        minutes = curve[k - 1]["seconds"] / 60
        rows.append({"max_length": max_length, "epochs": k, "selection": False, "kept_epoch": k,
                     "test_accuracy": curve[k - 1]["eval"][test]["accuracy"], "train_minutes": round(minutes, 2),
                     "selection_minutes": 0.0})
        best = max(curve[:k], key=lambda c: (c["eval"][select]["accuracy"], -c["eval"][select]["loss"], -c["epoch"]))
        rows.append({"max_length": max_length, "epochs": k, "selection": True, "kept_epoch": best["epoch"],
                     "selection_accuracy": best["eval"][select]["accuracy"],
                     "test_accuracy": best["eval"][test]["accuracy"], "train_minutes": round(minutes, 2),
                     "selection_minutes": round(per_epoch_eval * select_share * k / 60, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hh_rlhf", help="hh-rlhf rows (.jsonl or .jsonl.gz)")
    parser.add_argument("--work", help="folder for the split and the models (default: a temporary one)")
    parser.add_argument("--max-length", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs=3, default=[1200, 150, 150], metavar=("TRAIN", "SELECT", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="also run 1 epoch alone, to compare with epoch 1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work or temporary)
        work.mkdir(parents=True, exist_ok=True)
        files = split(args.hh_rlhf, work, tuple(args.sizes), args.seed)
        table = []
        for max_length in args.max_length:
            metrics = train(files, work / f"pm-{max_length}", max_length, args.epochs, True, args.seed)
            rows = rows_of(metrics, files, max_length)
            for row in rows:
                print(json.dumps(row), flush=True)
            table += rows
            if args.check:
                alone = train(files, work / f"pm-{max_length}-1", max_length, 1, False, args.seed)
                print(json.dumps({"check": f"{max_length} tokens, 1 epoch alone", "test_accuracy":
                                  alone["eval"][str(files["test"])]["accuracy"],
                                  "train_minutes": round(alone["seconds"] / 60, 2)}), flush=True)
    print("\n| --max-length | epochs | selection | kept epoch | test accuracy | minutes (train + selection) |")
    print("|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['max_length']} | {row['epochs']} | {'yes' if row['selection'] else 'no'} | {row['kept_epoch']} "
              f"| {row['test_accuracy']:.3f} | {row['train_minutes']:.1f} + {row['selection_minutes']:.1f} |")


if __name__ == "__main__":
    main()
