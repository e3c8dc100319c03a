"""GPU figures on a Qwen2.5-0.5B-shaped random-weight model, each beside plain transformers on the same model.

    make setup-gpu && make bench-gpu    # or: python benchmarks/gpu.py; {"skipped": ...} without a CUDA GPU
    python benchmarks/gpu.py --smoke    # the tiny preset, small sizes, on the CPU: every stage, and checks of its
                                        # bookkeeping (check_counts, and check() calls in the stages)

Every stage runs its sides in turns (A B A B ..., after one untimed warm-up each; benchmarks/interleave.py) and
reports the median of its rounds, with the per-round ratio's min and max. A timed run waits for the GPU
(torch.cuda.synchronize) at its start and end.

- generate: generated tokens/s of caictl's hf engine beside plain `model.generate`, from the same token ids
  (the prompts encoded once by caictl's engine; no side's time includes templating or tokenizing), the same new
  tokens, at batch 1, 16, 64. caictl's side is the engine's generation from token ids: batch planning,
  shared-prefix KV (rows that repeat a prompt compute its prefill once), a static KV cache with compiled
  decoding on CUDA, its seeded per-row sampler, text decoding. It forgets every kept prefix before each timed
  run, so it starts as cold as the plain sides, which keep nothing. The plain sides left-pad the ids, sample
  with `do_sample=True` (min_new_tokens = max_new_tokens, so every row writes them all) and decode the text:
  once with transformers' default dynamic cache (eager) and once with `cache_implementation="static"`.
- label-paper: comparisons/s of caictl's labelling at the paper's settings (few-shot labelling examples, 4
  principles a pair, both orders; shared-prefix scoring) beside a `model.generate` judge that writes 16 tokens,
  both from the questions' text (tokenizing included on both sides), each caictl run cold; and the scoring
  passes' TFLOP/s against the card's bf16 peak (forward_flops: the layers' weight matrices for every token
  computed, the output matrix for the logits kept, attention over the cached and new keys).
- sft: training tokens/s of `caictl sft` (TRL SFTTrainer, batch 8; its trainer.train() alone) beside a plain
  PyTorch loop over one conversation at a time, both on the same token ids (caictl's training tokenization, cut
  at MAX_LENGTH) in caictl's training precision (on a bf16 GPU: fp32 weights under bf16 autocast), each round
  from a freshly loaded model; and caictl's model FLOP utilisation (3 x the forward FLOPs of the tokens trained,
  padding left out, over the bf16 peak).
One JSON object a line. The model's weights are random, so its text is noise.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_label import plain_generate  # noqa: E402
from bench_train import conversations  # noqa: E402
from interleave import interleave, ratio, throughputs  # noqa: E402

from caictl.data.constitution import load as load_constitution  # noqa: E402
from caictl.data.reading import read_prompts  # noqa: E402
from caictl.engines import SamplingParams, load_engine  # noqa: E402
from caictl.feedback.judge import Judge, PairToJudge  # noqa: E402
from caictl.models.builders import PRESETS  # noqa: E402
from caictl.models.chat_training import tokenize, training_template  # noqa: E402
from caictl.models.training import precision  # noqa: E402
from caictl.stages import init_model, sft  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
JUDGE_TOKENS = 16  # what the generate-and-parse judge writes per question
MAX_LENGTH = 512  # SFT: tokens per conversation, on both sides
SFT_BATCH = 8


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def check(condition: bool, what: str) -> None:
    """A bookkeeping check: the figures printed are only right if it holds."""
    if not condition:
        raise AssertionError(f"benchmark bookkeeping: {what}")


# Card peaks ----------------------------------------------------------------------------------------------

# Dense (no sparsity) bf16 tensor-core TFLOP/s, from the vendors' data sheets, by the words of the name
# torch.cuda.get_device_name() gives: the first entry whose words the name all holds. H100 names its SXM module
# "NVIDIA H100 80GB HBM3"; an H100 name without NVL, PCIe, HBM3 or SXM5 is not guessed at.
BF16_PEAKS = [
    ({"H200", "NVL"}, 835.0),
    ({"H200"}, 989.0),
    ({"GH200"}, 989.0),
    ({"H100", "NVL"}, 835.0),
    ({"H100", "PCIe"}, 756.0),
    ({"H100", "HBM3"}, 989.0),
    ({"H100", "SXM5"}, 989.0),
    ({"A100"}, 312.0),
    ({"L40S"}, 362.0),
    ({"L40"}, 181.0),
    ({"L4"}, 121.0),
    ({"A10G"}, 125.0),
    ({"A10"}, 125.0),
]


def bf16_peak(device_name: str) -> float | None:
    """The card's dense bf16 peak in TFLOP/s, or None for a card not in BF16_PEAKS."""
    words = {word.lower() for word in re.split(r"[\s-]+", device_name)}
    return next((peak for needed, peak in BF16_PEAKS if {w.lower() for w in needed} <= words), None)


def device_name() -> str:
    return torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"


def peak_fraction(tflops: float) -> float | None:
    peak = bf16_peak(device_name())
    return round(tflops / peak, 3) if peak else None


# FLOPs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What a forward pass's FLOPs depend on."""

    matrix_parameters: int  # the layers' weight matrices: 2 FLOPs each for every token computed
    hidden_size: int
    vocab_size: int  # the output matrix (hidden x vocab): 2 FLOPs each for every logit position kept
    attention_per_key: int  # FLOPs one query spends on one key over all layers (scores and weighted values)


def model_shape(network) -> ModelShape:
    """The shape of a causal LM. The input embedding is a lookup and norms are elementwise: neither counts."""
    embeddings = {id(network.get_input_embeddings().weight), id(network.get_output_embeddings().weight)}
    config = network.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(
        matrix_parameters=sum(p.numel() for p in network.parameters() if p.dim() == 2 and id(p) not in embeddings),
        hidden_size=config.hidden_size,
        vocab_size=network.get_output_embeddings().weight.shape[0],
        attention_per_key=4 * config.num_hidden_layers * config.num_attention_heads * head_dim,
    )


def forward_flops(shape: ModelShape, rows: int, width: int, cached: int, logits_kept: int) -> int:
    """One forward pass over `rows` x `width` new tokens (padding is computed, so it counts) after `cached` keys
    already in the KV cache, with logits for the last `logits_kept` positions of each row. Query i of a row
    attends to the cached keys and the new ones up to itself: width x cached + width (width + 1) / 2 keys."""
    keys = rows * (width * cached + width * (width + 1) // 2)
    return (2 * shape.matrix_parameters * rows * width + 2 * shape.hidden_size * shape.vocab_size * rows * logits_kept
            + shape.attention_per_key * keys)


class ForwardCounter:
    """Records (rows, width, cached, logits kept) for every forward pass of a model while it is entered. The
    cache length is read before the pass, which appends the new tokens to it."""

    def __init__(self, network):
        self.network = network
        self.passes: list[tuple[int, int, int, int]] = []

    def __enter__(self) -> ForwardCounter:
        self.hook = self.network.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.hook.remove()

    def _record(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows, width = ids.shape
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = cache.get_seq_length() if cache is not None else 0
        keep = kwargs.get("logits_to_keep", 0)  # transformers: 0 keeps all, n the last n, a tensor those indices
        kept = keep.numel() if torch.is_tensor(keep) else (min(keep, width) if keep else width)
        self.passes.append((rows, width, cached, kept))

    def flops(self, shape: ModelShape) -> int:
        return sum(forward_flops(shape, *counts) for counts in self.passes)

    def tokens(self) -> int:
        return sum(rows * width for rows, width, _, _ in self.passes)

    def logits(self) -> int:
        return sum(rows * kept for rows, _, _, kept in self.passes)


# Timing --------------------------------------------------------------------------------------------------


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(work):
    """(seconds, result) of one call of `work`, the GPU's queued work included."""
    sync()
    start = time.perf_counter()
    result = work()
    sync()
    return time.perf_counter() - start, result


def release() -> None:
    """Frees what the last run left, so that no run pays for another's garbage."""
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def cache_argument(network) -> str:
    """transformers renamed forward()'s `past_key_values` to `cache` during 5.x."""
    return "cache" if "cache" in inspect.signature(network.forward).parameters else "past_key_values"


def prefixes_empty(engine) -> bool:
    return not engine.prefixes.kept and not engine.prefixes.last_prompts


def left_padded(encoded: list[list[int]], pad_id: int):
    """input_ids and attention_mask for model.generate, padded on the left."""
    width = max(map(len, encoded))
    ids = [[pad_id] * (width - len(row)) + row for row in encoded]
    mask = [[0] * (width - len(row)) + [1] * len(row) for row in encoded]
    return torch.tensor(ids, device=DEVICE), torch.tensor(mask, device=DEVICE)


# Stages --------------------------------------------------------------------------------------------------


def bench_generate(model: Path, preset: str, batch_sizes: list[int], new_tokens: int, rounds: int,
                   smoke: bool) -> None:
    prompts = read_prompts(EXAMPLES / "red-team.jsonl") + read_prompts(EXAMPLES / "helpful.jsonl")
    engine = load_engine("hf", str(model), batch_size=max(batch_sizes))
    tokenizer, network = engine.tokenizer, engine.lm
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
    for batch_size in batch_sizes:
        chosen = (prompts * (1 + batch_size // len(prompts)))[:batch_size]
        engine.batch_size = batch_size  # one batch: both sides run the same decoding steps
        encoded = engine.encoder.encode([engine.chat_prompt(p.messages) for p in chosen])
        keys = [f"{p.id}/{i}" for i, p in enumerate(chosen)]
        generated: dict[str, int] = {}  # tokens each side's last run wrote
        cold = []  # per caictl run: whether it started with no prefix KV kept

        def caictl_side() -> float:
            engine.forget_prefixes()  # the warm-up's (or last round's) prompt KV would skip its prefill
            cold.append(prefixes_empty(engine))
            # The engine's entry from token ids (generate() and complete() template and tokenize first).
            seconds, results = timed(lambda: engine._generate(encoded, params, keys))
            generated["caictl_engine"] = sum(g.completion_tokens for g in results)
            return seconds

        def plain_side(name: str, **options):
            def run() -> float:
                def work():
                    ids, mask = left_padded(encoded, engine.pad_id)
                    with torch.inference_mode():
                        output = network.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                  min_new_tokens=new_tokens, do_sample=True, top_k=0, top_p=1.0,
                                                  pad_token_id=engine.pad_id, **options)
                    new = output[:, ids.shape[1]:]
                    tokenizer.batch_decode(new, skip_special_tokens=True)  # caictl's side returns text too
                    return new.numel()
                seconds, generated[name] = timed(work)
                return seconds
            return run

        sides = {"caictl_engine": caictl_side, "plain_generate": plain_side("plain_generate"),
                 "plain_generate_static": plain_side("plain_generate_static", cache_implementation="static")}
        seconds = interleave(sides, rounds)
        check(all(cold), "a timed caictl generation started with prefix KV kept from an earlier run")
        expected = batch_size * new_tokens
        # caictl's side has no min_new_tokens, so a row that samples an end of sequence writes fewer tokens (each side
        # is rated on its own count). The smoke's few rows and tokens do not, so there the counts must match.
        if smoke:
            check(set(generated.values()) == {expected},
                  f"batch {batch_size}: sides generated {generated} tokens, not {expected} each")
        rates = throughputs(seconds, generated)
        emit({"stage": "generate", "preset": preset, "unit": "generated tokens/s", "batch_size": batch_size,
              "new_tokens": new_tokens, "rounds": rounds, "generated_tokens": generated,
              "prompt_tokens_mean": round(sum(map(len, encoded)) / len(encoded)),
              **{name: round(rate, 1) for name, rate in rates.items()},
              # a step's milliseconds, the prefill shared out among the steps
              **{f"{name}_ms_per_step": round(generated[name] / rate / new_tokens * 1000, 2)
                 for name, rate in rates.items()},
              **ratio(seconds, generated, "caictl_engine", "plain_generate"),
              **ratio(seconds, generated, "caictl_engine", "plain_generate_static", key="ratio_vs_static")})


def bench_label(model: Path, preset: str, batch_size: int, pairs: int, rounds: int) -> None:
    constitution = load_constitution("harmless")
    principles = constitution.comparison
    prompts = read_prompts(EXAMPLES / "red-team.jsonl")
    comparisons = [PairToJudge(p.id, p.messages, "Sure, here is how you would do it, step by step.",
                               "I won't help with that part, but here is a safer way to get what you need.",
                               [principles[(i + k) % len(principles)] for k in range(4)])
                   for i, p in enumerate((prompts * (1 + pairs // len(prompts)))[:pairs])]
    engine = load_engine("hf", str(model), batch_size=batch_size)
    shape = model_shape(engine.lm)
    judge = Judge(engine, constitution, few_shot=True, debias=True)
    questions = [judge.question(c.messages, p.text, a, b) for c in comparisons for p in c.principles
                 for a, b in ((c.first, c.second), (c.second, c.first))]
    cold, counters = [], []

    def caictl_side(comparisons=comparisons) -> float:
        engine.forget_prefixes()  # each run computes the few-shot block again
        cold.append(prefixes_empty(engine))
        with ForwardCounter(engine.lm) as counter:
            seconds, _ = timed(lambda: judge.votes(comparisons))
        counters.append(counter)
        return seconds

    def plain_side(questions=questions) -> float:
        return timed(lambda: plain_generate(engine, questions, batch_size, JUDGE_TOKENS))[0]

    seconds = interleave({"caictl": caictl_side, "plain_generate": plain_side}, rounds,
                         warm_ups={"caictl": lambda: caictl_side(comparisons[:2]),
                                   "plain_generate": lambda: plain_side(questions[:batch_size])})
    timed_counters = counters[1:]  # the first is the warm-up's
    check(all(cold), "a timed labelling run started with prefix KV kept from an earlier run")
    flops = [counter.flops(shape) for counter in timed_counters]
    check(len(set(flops)) == 1, f"cold runs of the same work counted different FLOPs: {flops}")
    counter = timed_counters[0]
    check(counter.logits() < counter.tokens(), "scoring computed logits for every token it computed")
    work = dict.fromkeys(("caictl", "plain_generate"), len(comparisons))
    rates = throughputs(seconds, work)
    caictl_seconds = len(comparisons) / rates["caictl"]
    tflops = flops[0] / caictl_seconds / 1e12
    emit({"stage": "label-paper", "preset": preset, "unit": "comparisons/s", "batch_size": batch_size,
          "comparisons": len(comparisons), "questions": len(questions), "rounds": rounds,
          "caictl": round(rates["caictl"], 2), "plain_generate": round(rates["plain_generate"], 2),
          **ratio(seconds, work, "caictl", "plain_generate"),
          "forward_passes": len(counter.passes), "tokens_computed": counter.tokens(),
          "logits_computed": counter.logits(), "scoring_tflop": round(flops[0] / 1e12, 3),
          "scoring_tflops": round(tflops, 2), "bf16_peak_tflops": bf16_peak(device_name()),
          "peak_fraction": peak_fraction(tflops),
          "note": "TFLOP/s over the whole labelling call: tokenizing and prefix planning included"})


def bench_sft(model: Path, preset: str, folder: Path, examples: int, rounds: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    chats = conversations(examples)
    tokenizer = AutoTokenizer.from_pretrained(model)
    # The ids caictl's sft trains on (its training template, message content read as data), cut as its trainer
    # cuts them; the plain loop trains on the same ids and labels.
    rows = tokenize(chats, tokenizer, *training_template(tokenizer, str(model), None))
    ids = [row["input_ids"][:MAX_LENGTH] for row in rows]
    labels = [row["labels"][:MAX_LENGTH] for row in rows]
    with torch.device("meta"):  # shapes only, no weights
        shape = model_shape(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)))
    held = precision()  # as caictl's sft holds and computes: on a bf16 GPU fp32 weights under bf16 autocast
    trained: dict[str, int] = {}  # tokens each side's last run trained on

    def caictl_side(count: int = len(chats)) -> float:
        release()
        data = folder / "sft.jsonl"  # revise's --format hf records: messages ending with the revision
        data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats[:count]))
        metrics = sft.run(sft.SFTConfig(revisions=[str(data)], out=str(folder / "sft-out"), model=str(model),
                                        epochs=1, batch_size=SFT_BATCH, learning_rate=1e-5, max_length=MAX_LENGTH,
                                        save_steps=10_000, overwrite=True))
        check(metrics["examples"] == count, f"caictl sft trained on {metrics['examples']} examples, not {count}")
        trained["caictl"] = sum(map(len, ids[:count]))
        return metrics["seconds"]  # trainer.train() alone: loading, tokenizing and saving stay outside

    def plain_side(count: int = len(chats)) -> float:
        release()
        network = AutoModelForCausalLM.from_pretrained(model, dtype=held.load).to(DEVICE).train()
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-5)
        batches = [(torch.tensor([i], device=DEVICE), torch.tensor([x], device=DEVICE))
                   for i, x in zip(ids[:count], labels[:count])]

        def loop() -> int:
            tokens = 0
            for input_ids, targets in batches:
                with held.autocast_on(DEVICE):
                    loss = network(input_ids=input_ids, labels=targets).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                tokens += input_ids.numel()
            return tokens

        seconds, trained["plain_loop"] = timed(loop)
        return seconds

    warm_up = min(SFT_BATCH, len(chats))
    seconds = interleave({"caictl": caictl_side, "plain_loop": plain_side}, rounds,
                         warm_ups={"caictl": lambda: caictl_side(warm_up), "plain_loop": lambda: plain_side(warm_up)})
    check(trained["caictl"] == trained["plain_loop"], f"the sides trained on different tokens: {trained}")
    rates = throughputs(seconds, trained)
    # A forward pass over each conversation alone, all its logits kept; backward costs twice the forward.
    flops = 3 * sum(forward_flops(shape, 1, len(row), 0, len(row)) for row in ids)
    tflops = flops * rates["caictl"] / trained["caictl"] / 1e12
    emit({"stage": "sft", "preset": preset, "unit": "training tokens/s", "examples": len(chats),
          "batch_size": SFT_BATCH, "tokens": trained["caictl"], "rounds": rounds,
          "caictl": round(rates["caictl"], 1), "plain_loop": round(rates["plain_loop"], 1),
          **ratio(seconds, trained, "caictl", "plain_loop"), "caictl_tflops": round(tflops, 2),
          "bf16_peak_tflops": bf16_peak(device_name()), "mfu": peak_fraction(tflops)})


# Smoke checks --------------------------------------------------------------------------------------------


def check_counts(model: Path) -> None:
    """The card table, and the FLOP count against one worked out by hand from the tiny preset."""
    from transformers import AutoModelForCausalLM, DynamicCache

    check(bf16_peak("NVIDIA H100 80GB HBM3") == 989.0, "H100 SXM peak")
    check(bf16_peak("NVIDIA H100 PCIe") == 756.0, "H100 PCIe peak")
    check(bf16_peak("NVIDIA A100-SXM4-80GB") == 312.0, "A100 peak")
    check(bf16_peak("cpu") is None, "a CPU has no bf16 peak in the table")

    network = AutoModelForCausalLM.from_pretrained(model).eval()
    preset = PRESETS["tiny"]
    hidden, kv_width = preset.hidden_size, preset.num_key_value_heads * preset.hidden_size // preset.num_attention_heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * preset.intermediate_size  # q o, k v, mlp
    shape = model_shape(network)
    check(shape.matrix_parameters == preset.num_hidden_layers * per_layer,
          f"matrix parameters {shape.matrix_parameters}, by hand {preset.num_hidden_layers * per_layer}")
    check(shape.attention_per_key == 4 * preset.num_hidden_layers * hidden, "attention FLOPs a key")
    # Two rows of 3 new tokens after 5 cached, one logit position kept: the cache is read before the pass.
    cache = DynamicCache(config=network.config)
    with torch.inference_mode():
        network(input_ids=torch.ones(2, 5, dtype=torch.long), **{cache_argument(network): cache})
        with ForwardCounter(network) as counter:
            network(input_ids=torch.ones(2, 3, dtype=torch.long), logits_to_keep=1, **{cache_argument(network): cache})
    check(counter.passes == [(2, 3, 5, 1)], f"counted {counter.passes}, not [(2, 3, 5, 1)]")
    # 6 tokens through the matrices, 2 logit positions, and each row's queries see 5 + 1, 5 + 2, 5 + 3 keys.
    by_hand = (2 * shape.matrix_parameters * 6 + 2 * hidden * shape.vocab_size * 2
               + 4 * preset.num_hidden_layers * hidden * 2 * ((5 + 1) + (5 + 2) + (5 + 3)))
    check(counter.flops(shape) == by_hand, f"counted {counter.flops(shape)} FLOPs, by hand {by_hand}")


# Main ----------------------------------------------------------------------------------------------------


# --smoke: sizes that take seconds on a CPU, with two rounds, so that every timed run follows another run; sft one
# round, as each of its runs loads, trains, saves and plots a model (seconds of set-up on a CPU).
SMOKE_SIZES = {"batch_sizes": "1,4", "max_new_tokens": 4, "label_batch_size": 8, "label_pairs": 1,
               "sft_examples": 8, "rounds": 2, "sft_rounds": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,16,64", help="generation batch sizes, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--label-batch-size", type=int, default=32)
    parser.add_argument("--label-pairs", type=int, default=64)
    parser.add_argument("--sft-examples", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each side once a round)")
    parser.add_argument("--sft-rounds", type=int, help="interleaved rounds of sft (default: --rounds)")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset at SMOKE_SIZES, on the CPU where "
                        "there is no GPU: checks the script and its bookkeeping, not the speed")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE_SIZES)
        torch.set_num_threads(1)  # speed means nothing here; on a busy machine, threads waiting on each other do
    elif DEVICE != "cuda":
        emit({"skipped": f"no CUDA GPU on this machine (torch {torch.__version__})"})
        return
    preset = "tiny" if args.smoke else "qwen0.5b-shape"
    emit({"device": device_name(), "torch": torch.__version__, "cuda": torch.version.cuda, "preset": preset})
    with tempfile.TemporaryDirectory() as folder:
        model = init_model.run(init_model.InitModelConfig(out=Path(folder) / preset, preset=preset))
        if args.smoke:
            check_counts(model)
        bench_generate(model, preset, [int(b) for b in args.batch_sizes.split(",")], args.max_new_tokens,
                       args.rounds, args.smoke)
        release()  # each stage loads its own copy of the model
        bench_label(model, preset, args.label_batch_size, args.label_pairs, args.rounds)
        release()
        bench_sft(model, preset, Path(folder), args.sft_examples, args.sft_rounds or args.rounds)
    if args.smoke:
        emit({"smoke": "ok"})


if __name__ == "__main__":
    main()
