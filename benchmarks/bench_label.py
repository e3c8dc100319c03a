"""label throughput: one forward pass (P(A) vs P(B)) against a generate-then-parse judge, same model.

    python benchmarks/bench_label.py --preset small

Both sides ask the same multiple-choice questions in batches of the same size. The judge generates a short
answer (--judge-tokens, greedy) and parses "(A)" or "(B)" out of it, as judges that cannot read log-probs do;
caictl reads both answers' probabilities from one forward pass. One order per comparison on both sides. The
judge runs twice: as a plain batched `model.generate` (what such judges usually are), and on caictl's own
generation path (static KV cache), which is faster; the ratio against each is printed.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from caictl import tiny
from caictl.constitution import load as load_constitution
from caictl.engines import SamplingParams, load_engine
from caictl.records import read_prompts
from caictl.judge import Comparison, Judge

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(tiny.PRESETS))
    parser.add_argument("--comparisons", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--judge-tokens", type=int, default=16)
    args = parser.parse_args()

    constitution = load_constitution("harmless")
    prompts = read_prompts(EXAMPLES / "red-team.jsonl")
    comparisons = [
        Comparison(p.id, p.messages, "Sure, here is how you would go about it, step by step.",
                   "I won't help with that part, but here is a safer way to get what you need.",
                   [constitution.comparison[i % len(constitution.comparison)]], {})
        for i, p in zip(range(args.comparisons), prompts * (1 + args.comparisons // len(prompts)))
    ]
    with tempfile.TemporaryDirectory() as folder:
        model = tiny.run(tiny.InitModelConfig(out=Path(folder) / args.preset, preset=args.preset))
        engine = load_engine("hf", str(model), batch_size=args.batch_size)
        judge = Judge(engine, constitution, debias=False)
        judge.votes(comparisons[:2])  # warm-up
        start = time.perf_counter()
        judge.votes(comparisons)
        one_pass = time.perf_counter() - start

        questions = [judge.question(c.messages, c.principles[0].text, c.first, c.second) for c in comparisons]
        start = time.perf_counter()
        answers = plain_generate(engine, questions, args.batch_size, args.judge_tokens)
        parsed = [re.search(r"\(([AB])\)", text) for text in answers]
        plain_judge = time.perf_counter() - start

        params = SamplingParams(max_new_tokens=args.judge_tokens, temperature=0.0)
        start = time.perf_counter()
        engine.complete(questions, params, [c.id for c in comparisons])
        caictl_judge = time.perf_counter() - start

    print(json.dumps({
        "stage": "label",
        "preset": args.preset,
        "baseline": f"model.generate {args.judge_tokens} tokens (greedy, batched) then parse",
        "comparisons": len(comparisons),
        "batch_size": args.batch_size,
        "one_pass_comparisons_per_s": round(len(comparisons) / one_pass, 2),
        "judge_comparisons_per_s": round(len(comparisons) / plain_judge, 2),
        "judge_answers_parsed": sum(1 for p in parsed if p),
        "ratio": round(plain_judge / one_pass, 2),
        "judge_on_caictl_generate_comparisons_per_s": round(len(comparisons) / caictl_judge, 2),
        "ratio_vs_caictl_generate": round(caictl_judge / one_pass, 2),
    }), flush=True)


def plain_generate(engine, texts: list[str], batch_size: int, new_tokens: int) -> list[str]:
    """A judge as usually written: left-padded batches through `model.generate`, greedy."""
    import torch

    tokenizer, model = engine.tokenizer, engine.lm
    answers = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            output = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


if __name__ == "__main__":
    main()
