"""revise throughput: batched hf engine against a one-prompt-at-a-time loop, same model, same process.

    python benchmarks/bench_revise.py --preset small --batch-size 32

Prints one JSON object a line: stage, preset, the two throughputs (prompts/s) and their ratio. Both sides run
the same Reviser with the same settings on the same prompts; only the batch size differs. A sequential loop's
throughput does not depend on how many prompts it runs, so the baseline runs the first --baseline-prompts
of them, to keep the benchmark short.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from caictl import tiny
from caictl.constitution import load as load_constitution
from caictl.engines import load_engine
from caictl.records import read_prompts
from caictl.stages.revise import ReviseConfig, Reviser, Totals

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def measure(reviser: Reviser, prompts, one_at_a_time: bool) -> tuple[float, int]:
    totals = Totals()
    start = time.perf_counter()
    if one_at_a_time:
        for prompt in prompts:
            reviser.revise([prompt], totals)
    else:
        reviser.revise(prompts, totals)
    return time.perf_counter() - start, totals.completion_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(tiny.PRESETS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=64, help="at most 100 (both example sets)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline-prompts", type=int, default=8)
    parser.add_argument("--no-few-shot", action="store_true", help="short prompts: no worked examples shown")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="revise's default")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        model = tiny.run(tiny.InitModelConfig(out=Path(folder) / args.preset, preset=args.preset))
        prompts = (read_prompts(EXAMPLES / "red-team.jsonl") + read_prompts(EXAMPLES / "helpful.jsonl"))[: args.prompts]
        config = ReviseConfig(model=str(model), rounds=args.rounds, max_new_tokens=args.max_new_tokens, shots=1,
                              few_shot=not args.no_few_shot, batch_size=args.batch_size)
        engine = load_engine("hf", str(model), batch_size=1)
        reviser = Reviser(engine, load_constitution("harmless"), config, "chat")
        measure(reviser, prompts[:1], one_at_a_time=True)  # warm-up: first-call allocations
        baseline = prompts[: args.baseline_prompts]
        baseline_s, baseline_tokens = measure(reviser, baseline, one_at_a_time=True)
        engine.batch_size = args.batch_size
        batched_s, batched_tokens = measure(reviser, prompts, one_at_a_time=False)

    print(json.dumps({
        "stage": "revise",
        "preset": args.preset,
        "baseline": "one prompt at a time",
        "batch_size": args.batch_size,
        "prompts": len(prompts),
        "baseline_prompts": len(baseline),
        "rounds": args.rounds,
        "few_shot": not args.no_few_shot,
        "max_new_tokens": args.max_new_tokens,
        "baseline_prompts_per_s": round(len(baseline) / baseline_s, 3),
        "batched_prompts_per_s": round(len(prompts) / batched_s, 3),
        "baseline_tokens_per_s": round(baseline_tokens / baseline_s, 1),
        "batched_tokens_per_s": round(batched_tokens / batched_s, 1),
        "ratio": round((len(prompts) / batched_s) / (len(baseline) / baseline_s), 2),
    }), flush=True)


if __name__ == "__main__":
    main()
