"""revise throughput: caictl's batched hf engine against a one-prompt loop and against plain batched generate.

    python benchmarks/bench_revise.py --preset small --batch-size 32

Prints one JSON object: the sides' throughputs (prompts/s, generated tokens/s) and two ratios, each the median
of per-round ratios with its min and max (the sides take turns, see interleave.py). Every side runs the same
revise work on the same model in the same process: revise's max_new_tokens and sampling, --revise-rounds
critique-revision rounds, one shared few-shot exchange (none with --no-few-shot).
- caictl: the Reviser on the hf engine at --batch-size, on --prompts prompts.
- one prompt at a time (`ratio`): the same Reviser with the engine at batch 1. A loop's throughput does not
  depend on how many prompts it runs, so it runs the first --baseline-prompts of them, to keep the run short.
- plain batched generate (`ratio_vs_batched`): the very requests caictl's Reviser sends (its rendered chat
  texts, few-shot block included, recorded from caictl's run), step by step, through `model.generate` in
  left-padded batches of --batch-size in the order given, with the same max_new_tokens and sampling
  (temperature, top_p, no top-k).
- with --vs-windows, four-batch windows (`ratio_vs_four_batch_windows`): the same Reviser taking four batches of
  prompts through every round at once, as `caictl revise` did before it wrote each batch as it completes.
caictl's side revises --batch-size prompts at a time, as `caictl revise` does.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from interleave import interleave, ratio, throughputs, timed

from caictl.data.constitution import load as load_constitution
from caictl.data.reading import read_prompts
from caictl.data.writing import batches
from caictl.engines import load_engine
from caictl.stages import init_model as tiny
from caictl.stages.revise import ReviseConfig, Reviser, Totals

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WARM_UP_PROMPTS = 8  # the batched sides warm up on this many prompts, the loop on one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(tiny.PRESETS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=32, help="at most 100 (both example sets)")
    parser.add_argument("--baseline-prompts", type=int, default=4, help="prompts the one-prompt loop runs")
    parser.add_argument("--revise-rounds", type=int, default=1, help="critique-revision rounds per prompt")
    parser.add_argument("--no-few-shot", action="store_true", help="short prompts: no worked examples shown")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="revise's default is 256; half keeps three interleaved rounds within the old run time")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each side once per round)")
    parser.add_argument("--vs-windows", action="store_true",
                        help="also time four-batch windows (needs --prompts above --batch-size to differ)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        model = tiny.run(tiny.InitModelConfig(out=Path(folder) / args.preset, preset=args.preset))
        prompts = (read_prompts(EXAMPLES / "red-team.jsonl") + read_prompts(EXAMPLES / "helpful.jsonl"))[: args.prompts]
        loop_prompts = prompts[: args.baseline_prompts]
        config = ReviseConfig(model=str(model), rounds=args.revise_rounds, max_new_tokens=args.max_new_tokens,
                              shots=1, few_shot=not args.no_few_shot, batch_size=args.batch_size)
        constitution = load_constitution("harmless")
        engine = load_engine("hf", str(model), batch_size=args.batch_size)
        recorder = RecordingEngine(engine)
        # caictl's Reviser sends through the recorder, the loop's straight to the engine. Requests are sampled
        # with seeds per request, so every caictl run sends the same requests: the plain side, which runs after
        # caictl in every round, replays the latest run's.
        reviser, loop_reviser = (Reviser(e, constitution, config, "chat") for e in (recorder, engine))
        plain = PlainGenerate(engine.lm, str(model), args.batch_size, config)
        tokens = {}

        def caictl(prompts=prompts, window=args.batch_size, side="caictl") -> float:
            engine.batch_size = args.batch_size
            # Each run revises its prompts from scratch: shared few-shot prefixes are computed again.
            engine.forget_prefixes()
            recorder.requests = []
            totals = Totals()
            seconds = timed(lambda: [reviser.revise(chunk, totals) for chunk in batches(prompts, window)])
            tokens[side] = totals.completion_tokens
            return seconds

        def one_prompt_loop(prompts=loop_prompts) -> float:
            engine.batch_size = 1
            totals = Totals()
            seconds = timed(lambda: [loop_reviser.revise([prompt], totals) for prompt in prompts])
            tokens["loop"] = totals.completion_tokens
            return seconds

        def plain_generate() -> float:
            return timed(lambda: tokens.update(plain=plain.run(recorder.requests)))

        sides = {"caictl": caictl, "loop": one_prompt_loop, "plain": plain_generate}
        if args.vs_windows:
            # After the plain side, which replays the requests of caictl's run in the same round.
            sides["windows"] = lambda: caictl(window=4 * args.batch_size, side="windows")
        seconds = interleave(sides, args.rounds,
                             # The plain side warms up on the requests of caictl's warm-up.
                             warm_ups={"caictl": lambda: caictl(prompts[:WARM_UP_PROMPTS]),
                                       "loop": lambda: one_prompt_loop(loop_prompts[:1]),
                                       "windows": lambda: caictl(prompts[:WARM_UP_PROMPTS], side="windows")})

    work = {"caictl": len(prompts), "loop": len(loop_prompts), "plain": len(prompts)}
    if args.vs_windows:
        work["windows"] = len(prompts)
    rates = throughputs(seconds, work)
    token_rates = throughputs(seconds, tokens)
    print(json.dumps({
        "stage": "revise",
        "preset": args.preset,
        "baseline": "one prompt at a time (ratio); plain batched model.generate of the same requests "
                    "(ratio_vs_batched)",
        "batch_size": args.batch_size,
        "prompts": len(prompts),
        "baseline_prompts": len(loop_prompts),
        "revise_rounds": args.revise_rounds,
        "few_shot": not args.no_few_shot,
        "max_new_tokens": args.max_new_tokens,
        "rounds": args.rounds,
        "batched_prompts_per_s": round(rates["caictl"], 3),
        "baseline_prompts_per_s": round(rates["loop"], 3),
        "plain_generate_prompts_per_s": round(rates["plain"], 3),
        "batched_tokens_per_s": round(token_rates["caictl"], 1),
        "baseline_tokens_per_s": round(token_rates["loop"], 1),
        "plain_generate_tokens_per_s": round(token_rates["plain"], 1),
        **ratio(seconds, work, "caictl", "loop"),
        **ratio(seconds, work, "caictl", "plain", key="ratio_vs_batched"),
        **(ratio(seconds, work, "caictl", "windows", key="ratio_vs_four_batch_windows") if args.vs_windows else {}),
    }), flush=True)


class RecordingEngine:
    """The hf engine, noting the prompt text of every chat the Reviser sends, one list per engine call."""

    def __init__(self, engine):
        self.engine = engine
        self.requests: list[tuple[list[str], object]] = []  # (rendered prompts, SamplingParams) per call

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, chats, params, keys):
        self.requests.append(([self.engine.chat_prompt(chat) for chat in chats], params))
        return self.engine.generate(chats, params, keys)


class PlainGenerate:
    """Generation as usually written: left-padded batches through `model.generate`, sampling as revise does."""

    def __init__(self, model, path: str, batch_size: int, config: ReviseConfig):
        from transformers import AutoTokenizer

        self.model, self.batch_size = model, batch_size
        # Left truncation, as the hf engine cuts a too-long prompt: few-shot examples go first.
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", truncation_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.room = model.config.max_position_embeddings - config.max_new_tokens

    def run(self, requests) -> int:
        """Every call's prompts, in order; returns the number of tokens generated (up to each end of sequence)."""
        import torch

        torch.manual_seed(0)  # the same samples, so the same work, every round
        eos, generated = self.tokenizer.eos_token_id, 0
        for texts, params in requests:
            for first in range(0, len(texts), self.batch_size):
                # The rendered chat template already holds any BOS token.
                batch = self.tokenizer(texts[first:first + self.batch_size], return_tensors="pt", padding=True,
                                       truncation=True, max_length=self.room, add_special_tokens=False)
                with torch.inference_mode():
                    output = self.model.generate(
                        **batch.to(self.model.device), max_new_tokens=params.max_new_tokens,
                        do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0,
                        pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos)
                new = output[:, batch["input_ids"].shape[1]:]
                ended = (new == eos).any(1)
                generated += int(torch.where(ended, (new == eos).int().argmax(1) + 1, new.shape[1]).sum())
        return generated


if __name__ == "__main__":
    main()
