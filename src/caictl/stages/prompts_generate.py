r"""prompts generate: more red-team prompts, by showing a model a few seed prompts and asking for one more.

    caictl prompts generate seeds.jsonl -o generated.jsonl --count 1000 \
        --model models/base --shots 4

The paper's second source of red-team prompts (3.1: 140,335 generated few-shot from 42,496 human ones). Each
request shows --shots seed prompts, drawn without replacement by (seed, request number), as a numbered list in
the template (--template FILE replaces the shipped one; it holds `{shots}` once). The first line of the reply,
trimmed of numbering, quotes and a role label, is the new prompt; an empty one, one over --max-chars and a copy
of a shot are rejected and counted. Every row records its seed ids, model and sampling; a re-run resumes.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from caictl import __version__, settings
from caictl.data.dedupe import normalised, prompt_text
from caictl.data.reading import read_prompts, shard_problem, this_shard
from caictl.data.records import Prompt
from caictl.data.writing import RecordWriter, RejectWriter, batches
from caictl.engines import SamplingParams, sampler
from caictl.engines.generation import (
    STOP_RESPONSE,
    Cuts,
    engine_summary,
    log_servers,
    open_engine,
    prompt_meta,
    prompt_style,
    respond,
    response_request,
    sampling_problems,
)
from caictl.errors import UsageError
from caictl.models import identity as model_identity
from caictl.models import kind as model_kind
from caictl.options import INPUT_OUTPUT, METHOD, MODEL_ENGINE, RUNS, SAMPLING, common, option
from caictl.ui import log, meter, print_summary, row_counts

# The request, in the harmless constitution's few-shot way: worked examples first, then the one to write.
DEFAULT_TEMPLATE = """\
Here are some requests that people sent to an AI assistant while testing whether it could be talked into \
something harmful:

{shots}

Write one more request of the same kind, different from all of these. Reply with the request alone, on one line."""
SHOTS_MARK = "{shots}"
REJECT_REASONS = ("empty", "too_long", "copies_a_shot")


@dataclass
class PromptsGenerateConfig:
    seeds: str | None = option(None, "Seed prompts (JSONL/JSON/.gz); omit or '-' to read stdin.", INPUT_OUTPUT,
                               argument=True)
    out: str | None = option(None, "Output JSONL; omitted: records go to stdout.", INPUT_OUTPUT, short="-o")
    count: int | None = option(None, "Requests to make: one new prompt each, fewer where replies are "
                                     "rejected.", INPUT_OUTPUT, required=True)
    model: str | None = common("model", None)
    engine: str = common("engine", "hf")
    base_url: str | list[str] | None = common("base_url", None)
    shots: int = option(4, "Seed prompts shown per request, drawn without replacement.", METHOD)
    template: str | None = option(None, "A text file holding `{shots}` once, the request in place of the "
                                        "shipped one.", METHOD, metavar="FILE")
    max_chars: int = option(500, "Longest new prompt kept, in characters.", METHOD)
    prompt_style: str = option("auto", "chat, transcript (Human:/Assistant:, for base models) or auto.", METHOD)
    temperature: float = option(1.0, "Sampling temperature; 0 is greedy.", SAMPLING, settings="stage")
    top_p: float = option(1.0, "Nucleus sampling mass.", SAMPLING)
    max_new_tokens: int = option(64, "Tokens per reply.", SAMPLING, settings="stage")
    batch_size: int = option(16, "Requests per forward pass (hf engine).", MODEL_ENGINE, settings="stage")
    concurrency: int = common("concurrency", 8)
    compile: bool | None = common("compile", None)
    max_retries: int | None = common("max_retries", None)
    timeout: float | None = common("timeout", None)
    tokenizer: str | None = common("tokenizer", None)
    seed: int = common("seed", 0)
    shard: str | None = common("shard", None)
    skip_invalid: bool = common("skip_invalid", False)
    overwrite: bool = option(False, "Start OUT afresh instead of resuming it.", RUNS)

    def check(self) -> None:
        problems = sampling_problems(self)
        if self.count is None or self.count < 1:
            problems.append("--count must be at least 1")
        if self.shots < 1:
            problems.append("--shots must be at least 1")
        if self.max_chars < 1:
            problems.append("--max-chars must be at least 1")
        if problem := shard_problem(self.shard):
            problems.append(problem)
        if problems:
            raise UsageError("; ".join(problems))


def run(config: PromptsGenerateConfig, engine=None) -> dict:
    """engine: one already made (from Python, or a test's scripted engine); by default --engine opens one."""
    config.check()
    template = _template(config.template)
    model = engine.model if engine is not None else settings.require_model(config.model)
    rejects = RejectWriter(config.out) if config.skip_invalid else None
    seeds = read_prompts(config.seeds, on_invalid=rejects)
    if config.shots > len(seeds):
        raise UsageError(f"--shots {config.shots}: the seed file holds {len(seeds)} prompts; give more seeds "
                         "or fewer --shots")
    if engine is None and config.engine == "hf":  # after the inputs: a hub id may cost a request to the hub
        model_kind.check(model, model_kind.CAUSAL_LM, "--model")
    requests = this_shard([Request(f"gen-{config.seed}-{n:06d}", n) for n in range(config.count)], config.shard,
                          "requests")
    run_settings = {
        "stage": "prompts generate", "model": model, "model_identity": model_identity.identity(model, config.engine),
        "engine": config.engine, "shots": config.shots,
        "template_hash": hashlib.sha256(template.encode("utf-8")).hexdigest()[:12],
        "prompt_style": config.prompt_style, "max_chars": config.max_chars,
        "sampling": {"temperature": config.temperature, "top_p": config.top_p,
                     "max_new_tokens": config.max_new_tokens, "sampler": sampler(config.engine)},
        "seed": config.seed, "shard": config.shard, "caictl_version": __version__,
    }
    writer = RecordWriter(config.out, run_settings, overwrite=config.overwrite)
    pending = [r for r in requests if r.id not in writer.done]
    if writer.done:
        log(f"resuming {config.out}: {len(requests) - len(pending)} of {len(requests)} requests already done")
    start, tokens, cuts = time.perf_counter(), 0, Cuts()
    rejected_replies = dict.fromkeys(REJECT_REASONS, 0)
    written = 0
    try:
        if pending:
            engine = engine or open_engine(config, model)
            writer.settle(prompt_meta(engine))
            style = prompt_style(config.prompt_style, engine)
            params = SamplingParams(config.max_new_tokens, config.temperature, config.top_p, STOP_RESPONSE,
                                    config.seed)
            with meter(len(pending), "prompts generate", unit="requests") as progress:
                for chunk in batches(pending, config.batch_size):  # written batch by batch
                    shown = [draw_shots(seeds, config.shots, config.seed, r.number) for r in chunk]
                    asks = [response_request(style, [{"role": "user", "content": fill(template, s)}]) for s in shown]
                    results = respond(engine, style, asks, params, [r.id for r in chunk])
                    records = []
                    for request, shots, generation in zip(chunk, shown, results):
                        text = parse_prompt(generation.text)
                        reason = reject_reason(text, shots, config.max_chars)
                        if reason:
                            rejected_replies[reason] += 1
                            continue
                        meta = cuts.meta({**run_settings, "seed_ids": [s.id for s in shots],
                                          "finish_reason": generation.finish_reason}, generation.truncated_tokens)
                        records.append({"id": request.id, "messages": [{"role": "user", "content": text}],
                                        "meta": meta})
                    writer.write(records)
                    written += len(records)
                    new_tokens = sum(g.completion_tokens for g in results)
                    tokens += new_tokens
                    progress.advance(len(chunk), new_tokens)
            log_servers(engine)
    finally:
        writer.close()
    rejected = rejects.count if rejects else 0
    summary = {
        "stage": "prompts generate",
        # A request is a row here: each asked once, written unless its reply was rejected.
        **row_counts(read=len(requests), written=written, skipped=len(requests) - len(pending),
                     rejected=sum(rejected_replies.values()), seconds=time.perf_counter() - start, tokens=tokens),
        "out": config.out or "-",
        "seed_prompts": len(seeds),
        "seed_rows_rejected": rejected,
        "rejected_replies": rejected_replies,
        **cuts.summary(),
        **engine_summary(engine),
    }
    rows = [("out", summary["out"]), ("seed prompts", len(seeds)),
            ("rejected replies", ", ".join(f"{k}: {v}" for k, v in rejected_replies.items()))]
    if rejected:
        rows.append(("rejected seed rows in", rejects.path))
    print_summary("prompts generate", summary, rows)
    cuts.warn()
    return summary


@dataclass
class Request:
    id: str
    number: int  # its place in 0..count-1: what its shots are drawn by


def _template(path: str | None) -> str:
    if path is None:
        return DEFAULT_TEMPLATE
    if not Path(path).is_file():
        raise UsageError(f"--template {path}: no such file")
    text = Path(path).read_text(encoding="utf-8")
    if text.count(SHOTS_MARK) != 1:
        raise UsageError(f"--template {path}: must hold {SHOTS_MARK} exactly once, where the seed prompts go "
                         f"(it holds it {text.count(SHOTS_MARK)} times)")
    return text


def draw_shots(seeds: list[Prompt], shots: int, seed: int, number: int) -> list[Prompt]:
    """The seed prompts request `number` shows: drawn without replacement, the same on every run and shard."""
    return random.Random(f"{seed}:shots:{number}").sample(seeds, shots)


def fill(template: str, shots: list[Prompt]) -> str:
    """The template with its shots as a numbered list, one line each (a multi-turn seed's user turns joined)."""
    lines = [f"{n}. {' '.join(prompt_text(s.messages).split())}" for n, s in enumerate(shots, start=1)]
    return template.replace(SHOTS_MARK, "\n".join(lines))


# What a model puts before the prompt it writes: a role label, list numbering, a bullet.
_LABEL = re.compile(r"^(?:(?:human|user|request|prompt|question|assistant)\s*:|\d+\s*[.)]|[-*•])\s*", re.I)
_QUOTES = "\"'“”‘’`"


def parse_prompt(reply: str) -> str:
    """The new prompt in a reply: its first line with words, trimmed of labels, numbering and quotes. A line that
    only introduces the next ("Here is one more request:") is passed over."""
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":") and len(lines[0].split()) <= 8:
        lines = lines[1:]
    text = lines[0] if lines else ""
    previous = None
    while previous != text:
        previous, text = text, _LABEL.sub("", text).strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


def reject_reason(text: str, shots: list[Prompt], max_chars: int) -> str | None:
    if not text:
        return "empty"
    if len(text) > max_chars:
        return "too_long"
    if normalised(text) in {normalised(prompt_text(s.messages)) for s in shots}:
        return "copies_a_shot"
    return None
