r"""sample: several responses per prompt from a policy, the pairs that the feedback model will compare.

    caictl sample examples/red-team.jsonl --model models/sl-cai -n 2 \
        -o pairs.jsonl
    caictl sample --from-revisions revisions.jsonl -o pairs.jsonl

The paper draws 2 responses per red-team prompt from the SL-CAI model (section 4.1). Each response is seeded
by (seed, prompt id, index), so a resumed run equals an uninterrupted one. `--from-revisions` skips sampling:
each revise record (caictl's, `--format hf`, or Anthropic's SL-CAI samples) becomes the pair (initial response,
final revision).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from caictl import __version__, settings
from caictl.data.reading import in_shard, read_prompts, read_rows, shard_problem, this_shard
from caictl.data.records import REVISION_FORMS, to_revision
from caictl.data.writing import RecordWriter, RejectWriter, batches, with_upstream
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
from caictl.errors import InputError, UsageError
from caictl.models import identity as model_identity
from caictl.models import kind as model_kind
from caictl.options import INPUT_OUTPUT, METHOD, MODEL_ENGINE, RUNS, SAMPLING, common, option
from caictl.ui import ROW_COUNTS, log, meter, print_summary, row_counts


@dataclass
class SampleConfig:
    prompts: str | None = option(None, "Input JSONL/JSON/.gz file; omit or '-' to read stdin.", INPUT_OUTPUT,
                                 argument=True)
    out: str | None = option(None, "Output JSONL; omitted: records go to stdout.", INPUT_OUTPUT, short="-o")
    model: str | None = common("model", None, help="The policy: a folder or hub id (hf engine), or the server's "
                                                   "model name (openai).")
    engine: str = common("engine", "hf")
    base_url: str | list[str] | None = common("base_url", None)
    n: int = option(2, "Responses per prompt (paper: 2).", SAMPLING, short="-n")
    temperature: float = option(1.0, "Sampling temperature; 0 is greedy.", SAMPLING, settings="stage")
    top_p: float = option(1.0, "Nucleus sampling mass.", SAMPLING)
    max_new_tokens: int = option(256, "Tokens per response.", SAMPLING, settings="stage")
    prompt_style: str = option("auto", "chat, transcript (Human:/Assistant:, for base models) or auto.", METHOD)
    batch_size: int = option(16, "Requests per forward pass (hf engine).", MODEL_ENGINE, settings="stage")
    concurrency: int = common("concurrency", 8)
    compile: bool | None = common("compile", None)
    max_retries: int | None = common("max_retries", None)
    timeout: float | None = common("timeout", None)
    tokenizer: str | None = common("tokenizer", None)
    seed: int = common("seed", 0)
    limit: int | None = option(None, "Only the first N prompts.", INPUT_OUTPUT)
    shard: str | None = common("shard", None)
    from_revisions: bool = option(False, "The input is revise output: pair each initial response with its final "
                                         "revision, no model.", INPUT_OUTPUT)
    skip_invalid: bool = common("skip_invalid", False)
    overwrite: bool = option(False, "Start OUT afresh instead of resuming it.", RUNS)

    def check(self) -> None:
        problems = sampling_problems(self)
        if self.n < 1 and not self.from_revisions:
            problems.append("-n must be at least 1")
        if self.limit is not None and self.limit < 1:
            problems.append("--limit must be at least 1")
        if problem := shard_problem(self.shard):
            problems.append(problem)
        if problems:
            raise UsageError("; ".join(problems))


def run(config: SampleConfig, engine=None) -> dict:
    """engine: one already made (from Python, or a test's scripted engine); by default --engine opens one."""
    config.check()
    if config.from_revisions:
        return _from_revisions(config)
    model = engine.model if engine is not None else settings.require_model(config.model)
    if engine is None and config.engine == "hf":
        model_kind.check(model, model_kind.CAUSAL_LM, "--model")
    rejects = RejectWriter(config.out) if config.skip_invalid else None
    prompts = read_prompts(config.prompts, on_invalid=rejects)[: config.limit]  # --limit first, then the shard
    prompts = this_shard(prompts, config.shard, "prompts")
    run_settings = {
        "stage": "sample", "model": model, "model_identity": model_identity.identity(model, config.engine),
        "engine": config.engine, "n": config.n,
        "prompt_style": config.prompt_style,
        "sampling": {"temperature": config.temperature, "top_p": config.top_p,
                     "max_new_tokens": config.max_new_tokens, "sampler": sampler(config.engine)},
        "seed": config.seed, "shard": config.shard, "caictl_version": __version__,
    }
    writer = RecordWriter(config.out, run_settings, overwrite=config.overwrite)
    pending = [p for p in prompts if p.id not in writer.done]
    if writer.done:
        log(f"resuming {config.out}: {len(prompts) - len(pending)} of {len(prompts)} prompts already done")
    start, tokens, cut_off = time.perf_counter(), 0, 0
    cuts = Cuts()
    try:
        if pending:
            engine = engine or open_engine(config, model)
            writer.settle(prompt_meta(engine))
            style = prompt_style(config.prompt_style, engine)
            params = SamplingParams(config.max_new_tokens, config.temperature, config.top_p, STOP_RESPONSE,
                                    config.seed)
            with meter(len(pending), "sample") as progress:
                for chunk in batches(pending, config.batch_size):  # written batch by batch
                    requests = [response_request(style, p.messages) for p in chunk for _ in range(config.n)]
                    keys = [f"{p.id}/sample/{k}" for p in chunk for k in range(config.n)]
                    results = respond(engine, style, requests, params, keys)
                    records = []
                    for i, prompt in enumerate(chunk):
                        mine = results[i * config.n:(i + 1) * config.n]
                        # The n requests share one prompt, so one cut. A prompt row made by an earlier stage
                        # (revise output, say) keeps that stage's meta under meta.upstream.
                        meta = with_upstream(cuts.meta(run_settings, mine[0].truncated_tokens),
                                             prompt.extra.get("meta"))
                        records.append({**prompt.extra, "id": prompt.id, "messages": prompt.messages,
                                        "responses": [g.text.strip() for g in mine],
                                        "finish_reasons": [g.finish_reason for g in mine],
                                        "meta": meta})
                        cut_off += sum(g.finish_reason == "length" for g in mine)
                    writer.write(records)
                    new_tokens = sum(g.completion_tokens for g in results)
                    tokens += new_tokens
                    progress.advance(len(chunk), new_tokens)
            log_servers(engine)
    finally:
        writer.close()
    rejected = rejects.count if rejects else 0
    summary = {"stage": "sample",
               **row_counts(read=len(prompts) + rejected, written=len(pending), skipped=len(prompts) - len(pending),
                            rejected=rejected, seconds=time.perf_counter() - start, tokens=tokens),
               "out": config.out or "-", "responses_per_prompt": config.n,
               "cut_off_at_max_new_tokens": cut_off, **cuts.summary(), **engine_summary(engine)}
    print_summary("sample", summary, [(k.replace("_", " "), v) for k, v in summary.items()
                                      if k != "stage" and k not in ROW_COUNTS])
    cuts.warn()
    return summary


def _from_revisions(config: SampleConfig) -> dict:
    """(initial response, final revision) pairs straight from revise output: no model involved."""
    run_settings = {"stage": "sample", "source": "revisions", "shard": config.shard, "caictl_version": __version__}
    writer = RecordWriter(config.out, run_settings, overwrite=config.overwrite)
    rejects = RejectWriter(config.out) if config.skip_invalid else None
    records, unrevised, pairs = [], 0, 0
    start = time.perf_counter()
    for row in read_rows(config.prompts, on_invalid=rejects):
        try:
            revised = to_revision(row.data)
            if revised is None:
                raise ValueError(f"not a revise record: expected {REVISION_FORMS}; run `caictl revise` first")
        except ValueError as error:
            if rejects is None:
                raise InputError(f"{row.where}: {error}")
            rejects(row, str(error))
            continue
        if revised.response in (None, revised.initial_response):
            unrevised += 1  # no revision made it: there is nothing to compare
            continue
        # --limit counts pairs already written too, so a re-run resumes instead of adding N more.
        pairs += 1
        if in_shard(revised.id, config.shard) and revised.id not in writer.done:
            records.append({"id": revised.id, "messages": revised.messages,
                            "responses": [revised.initial_response, revised.response],
                            "meta": with_upstream(run_settings, revised.meta)})
        if config.limit and pairs >= config.limit:
            break
    try:
        writer.write(records)
    finally:
        writer.close()
    rejected = rejects.count if rejects else 0
    # Every row taken in was written, already in OUT, unrevised or rejected: the sum is the rows read.
    skipped = unrevised + pairs - len(records)
    summary = {"stage": "sample",
               **row_counts(read=len(records) + skipped + rejected, written=len(records), skipped=skipped,
                            rejected=rejected, seconds=time.perf_counter() - start),
               "out": config.out or "-", "skipped_unrevised": unrevised}
    print_summary("sample --from-revisions", summary, [("out", summary["out"]), ("skipped unrevised", unrevised)])
    return summary
