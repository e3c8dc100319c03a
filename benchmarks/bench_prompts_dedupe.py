"""prompts dedupe at scale: 100,000 generated prompts through the real command (time and peak memory), and MinHash
LSH against the exact pairwise comparison a careful user would write, on a sample small enough for it.

    python benchmarks/bench_prompts_dedupe.py [--rows 100000] [--sample 2000]

The rows are made here, with repeats planted as generated prompt sets have them: an exact copy of an earlier row
(case and punctuation changed) or a near one (one word replaced, or two adjacent words swapped). The exact side
compares every pair of the sample's shingle sets with Python sets, dropping greedily in file order as the stage
does; both sides take turns (see interleave.py). Besides the speed ratio, `agreement` says how many of the exact
side's drops the stage made too (MinHash LSH may miss a pair at the threshold; it never drops one below it).
One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from interleave import interleave, ratio, timed

from caictl.data.dedupe import DEFAULT_SHINGLE_SIZE, DEFAULT_THRESHOLD, normalised, shingles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        rows = generated_rows(args.rows, random.Random(0))
        write(folder / "all.jsonl", rows)
        write(folder / "sample.jsonl", rows[: args.sample])

        # The whole file through the command line, in its own process: its peak memory is its own.
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "caictl", "prompts", "dedupe", folder / "all.jsonl",
                        "-o", folder / "all.out.jsonl"], check=True, capture_output=True)
        seconds = time.perf_counter() - start
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        kept_all = sum(1 for _ in open(folder / "all.out.jsonl"))

        from caictl.stages.prompts_dedupe import PromptsDedupeConfig, run

        texts = [r["messages"][0]["content"] for r in rows[: args.sample]]
        kept_by_stage = {}

        def stage() -> None:
            out = folder / "sample.out.jsonl"
            run(PromptsDedupeConfig(prompts=str(folder / "sample.jsonl"), out=str(out)))
            kept_by_stage["ids"] = {json.loads(line)["id"] for line in open(out)}

        kept_exactly = {}

        def exact() -> None:
            kept_exactly["ids"] = exact_dedupe(rows, texts)

        seconds_per_round = interleave({"caictl": lambda: timed(stage), "exact": lambda: timed(exact)},
                                       rounds=args.rounds)
    dropped_exact = {r["id"] for r in rows[: args.sample]} - kept_exactly["ids"]
    dropped_stage = {r["id"] for r in rows[: args.sample]} - kept_by_stage["ids"]
    print(json.dumps({
        "rows": args.rows, "seconds": round(seconds, 1), "rows_per_second": round(args.rows / seconds),
        "peak_rss_mib": round(peak_mib), "kept": kept_all, "threshold": DEFAULT_THRESHOLD,
        "sample": args.sample,
        **ratio(seconds_per_round, {"caictl": args.sample, "exact": args.sample}, "caictl", "exact"),
        "exact_dropped": len(dropped_exact), "caictl_dropped": len(dropped_stage),
        "agreement": round(len(dropped_exact & dropped_stage) / max(len(dropped_exact), 1), 4),
        "caictl_only": len(dropped_stage - dropped_exact),
    }))


def exact_dedupe(rows: list[dict], texts: list[str]) -> set[str]:
    """The baseline: every row against every kept row, exact Jaccard, the first of a group kept."""
    kept, seen, kept_ids = [], set(), set()
    for row, text in zip(rows, texts):
        key = normalised(text)
        if key in seen:
            continue
        seen.add(key)
        mine = shingles(text, DEFAULT_SHINGLE_SIZE)
        if any(len(mine & other) >= DEFAULT_THRESHOLD * len(mine | other) for other in kept):
            continue
        kept.append(mine)
        kept_ids.add(row["id"])
    return kept_ids


VOCABULARY_SIZE = 20_000
OPENINGS = ["How do I", "What is the best way to", "Can you tell me how to", "Why do people", "Is it legal to",
            "Write a story about", "Help me", "What happens if you", "Where can I find", "Explain why"]


def generated_rows(count: int, rng: random.Random) -> list[dict]:
    """Prompts of 6 to 30 words from a Zipf-like vocabulary, with about 5% exact and 10% near repeats."""
    vocabulary = [f"w{i}" for i in range(VOCABULARY_SIZE)]
    weights = [1 / (rank + 1) for rank in range(VOCABULARY_SIZE)]
    rows = []
    for n in range(count):
        draw = rng.random()
        if rows and draw < 0.05:
            text = rng.choice(rows)["messages"][0]["content"].upper().replace("?", "!")
        elif rows and draw < 0.15:
            words = rng.choice(rows)["messages"][0]["content"].split()
            i = rng.randrange(len(words) - 1)
            if rng.random() < 0.5:
                words[i] = rng.choice(vocabulary)
            else:
                words[i], words[i + 1] = words[i + 1], words[i]
            text = " ".join(words)
        else:
            text = rng.choice(OPENINGS) + " " + " ".join(rng.choices(vocabulary, weights, k=rng.randint(3, 27))) + "?"
        rows.append({"id": f"b{n}", "messages": [{"role": "user", "content": text}]})
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
