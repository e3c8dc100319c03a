"""label throughput: one forward pass (P(A) vs P(B)) against a generate-then-parse judge, same model.

    python benchmarks/bench_label.py --preset small

Both sides ask the same multiple-choice questions in batches of the same size. The judge generates a short
answer (--judge-tokens, greedy) and parses "(A)" or "(B)" out of it, as judges that cannot read log-probs do;
caictl reads both answers' probabilities from one forward pass. One order per comparison on both sides. The
judge runs twice: as a plain batched `model.generate` (what such judges usually are), and on caictl's own
generation path (static KV cache), which is faster; the ratio against each is printed. The three sides take
turns, each warmed up first (see interleave.py); every ratio is the median of per-round ratios, with its min
and max.

    python benchmarks/bench_label.py --paper [--family qwen2.5]

--paper asks labelling questions at the paper's settings: the constitution's few-shot labelling examples first,
4 principles per pair, both orders (8 questions a pair), against the same generate-and-parse judge asked the
same questions. caictl's scoring computes the few-shot block and each pair's conversation once (shared-prefix
KV); the judge computes every question whole. Each run starts cold (no prefix kept from an earlier run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

from interleave import interleave, ratio, throughputs, timed

from caictl.data.constitution import load as load_constitution
from caictl.data.reading import read_prompts
from caictl.engines import SamplingParams, load_engine
from caictl.feedback.judge import Judge, PairToJudge
from caictl.models.families import MODEL_FAMILIES
from caictl.stages import init_model as tiny

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WARM_UP = 8  # comparisons each side warms up on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(tiny.PRESETS))
    parser.add_argument("--comparisons", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--judge-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each side once per round)")
    parser.add_argument("--paper", action="store_true",
                        help="few-shot labelling questions, 4 principles a pair, both orders (stage label-paper)")
    parser.add_argument("--family", choices=MODEL_FAMILIES, help="--paper: a model in this family's shape and "
                        "tokenizer instead of caictl's own")
    args = parser.parse_args()
    if args.paper:
        return paper(args)

    constitution = load_constitution("harmless")
    prompts = read_prompts(EXAMPLES / "red-team.jsonl")
    comparisons = [
        PairToJudge(p.id, p.messages, "Sure, here is how you would go about it, step by step.",
                   "I won't help with that part, but here is a safer way to get what you need.",
                   [constitution.comparison[i % len(constitution.comparison)]], {})
        for i, p in zip(range(args.comparisons), prompts * (1 + args.comparisons // len(prompts)))
    ]
    with tempfile.TemporaryDirectory() as folder:
        model = tiny.run(tiny.InitModelConfig(out=Path(folder) / args.preset, preset=args.preset))
        engine = load_engine("hf", str(model), batch_size=args.batch_size)
        judge = Judge(engine, constitution, debias=False)
        questions = [judge.question(c.messages, c.principles[0].text, c.first, c.second) for c in comparisons]
        params = SamplingParams(max_new_tokens=args.judge_tokens, temperature=0.0)
        keys = [c.id for c in comparisons]
        parsed = []

        def one_pass(comparisons=comparisons) -> float:
            return timed(lambda: judge.votes(comparisons))

        def plain_judge(questions=questions) -> float:
            def generate_and_parse():
                answers = plain_generate(engine, questions, args.batch_size, args.judge_tokens)
                parsed[:] = [re.search(r"\(([AB])\)", text) for text in answers]
            return timed(generate_and_parse)

        def caictl_generate_judge(questions=questions) -> float:
            engine.forget_prefixes()  # each run computes the shared few-shot prefix again
            return timed(lambda: engine.complete(questions, params, keys[:len(questions)]))

        sides = {"one_pass": one_pass, "judge": plain_judge, "caictl_generate": caictl_generate_judge}
        seconds = interleave(sides, args.rounds, warm_ups={
            "one_pass": lambda: one_pass(comparisons[:WARM_UP]), "judge": lambda: plain_judge(questions[:WARM_UP]),
            "caictl_generate": lambda: caictl_generate_judge(questions[:WARM_UP])})

    work = dict.fromkeys(("one_pass", "judge", "caictl_generate"), len(comparisons))
    rates = throughputs(seconds, work)
    print(json.dumps({
        "stage": "label",
        "preset": args.preset,
        "baseline": f"model.generate {args.judge_tokens} tokens (greedy, batched) then parse",
        "comparisons": len(comparisons),
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "one_pass_comparisons_per_s": round(rates["one_pass"], 2),
        "judge_comparisons_per_s": round(rates["judge"], 2),
        "judge_answers_parsed": sum(1 for p in parsed if p),
        **ratio(seconds, work, "one_pass", "judge"),
        "judge_on_caictl_generate_comparisons_per_s": round(rates["caictl_generate"], 2),
        **ratio(seconds, work, "one_pass", "caictl_generate", key="ratio_vs_caictl_generate"),
    }), flush=True)


PAPER_PRINCIPLES = 4  # principles each pair is asked under, in both orders


def paper(args) -> None:
    constitution = load_constitution("harmless")
    principles = constitution.comparison
    prompts = read_prompts(EXAMPLES / "red-team.jsonl")
    comparisons = [
        PairToJudge(p.id, p.messages, "Sure, here is how you would go about it, step by step.",
                   "I won't help with that part, but here is a safer way to get what you need.",
                   [principles[(i + k) % len(principles)] for k in range(PAPER_PRINCIPLES)], {})
        for i, p in zip(range(args.comparisons), prompts * (1 + args.comparisons // len(prompts)))
    ]
    with tempfile.TemporaryDirectory() as folder:
        model = tiny.run(tiny.InitModelConfig(out=Path(folder) / "model", preset=args.preset, family=args.family))
        engine = load_engine("hf", str(model), batch_size=args.batch_size)
        judge = Judge(engine, constitution, few_shot=True, debias=True)
        questions = {c.id: [judge.question(c.messages, p.text, a, b) for p in c.principles
                            for a, b in ((c.first, c.second), (c.second, c.first))] for c in comparisons}
        parsed = []

        def one_pass(comparisons=comparisons) -> float:
            engine.forget_prefixes()  # each run computes the few-shot block again
            return timed(lambda: judge.votes(comparisons))

        def plain_judge(comparisons=comparisons) -> float:
            asked = [q for c in comparisons for q in questions[c.id]]

            def generate_and_parse():
                answers = plain_generate(engine, asked, args.batch_size, args.judge_tokens)
                parsed[:] = [re.search(r"\(([AB])\)", text) for text in answers]
            return timed(generate_and_parse)

        seconds = interleave({"one_pass": one_pass, "judge": plain_judge}, args.rounds, warm_ups={
            "one_pass": lambda: one_pass(comparisons[:2]), "judge": lambda: plain_judge(comparisons[:2])})
        encoded = engine.encoder.encode([q for qs in questions.values() for q in qs])
        # What every question starts with: the few-shot block (and the template's opening).
        shared_start = len(os.path.commonprefix(encoded))

    work = dict.fromkeys(("one_pass", "judge"), len(comparisons))
    rates = throughputs(seconds, work)
    print(json.dumps({
        "stage": "label-paper",
        "preset": args.preset,
        "family": args.family,
        "baseline": f"model.generate {args.judge_tokens} tokens (greedy, batched) then parse",
        "comparisons": len(comparisons),
        "questions_per_comparison": 2 * PAPER_PRINCIPLES,
        "question_tokens_mean": round(sum(map(len, encoded)) / len(encoded)),
        "shared_start_tokens": shared_start,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "one_pass_comparisons_per_s": round(rates["one_pass"], 2),
        "judge_comparisons_per_s": round(rates["judge"], 2),
        "judge_answers_parsed": sum(1 for p in parsed if p),
        **ratio(seconds, work, "one_pass", "judge"),
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
