"""label: AI preference labels. A feedback model compares two responses under a constitution principle.

    caictl label pairs.jsonl -o prefs.jsonl --model models/feedback --soft --clamp 0.4 0.6

Each comparison is a multiple-choice question (paper, section 4.1): the conversation, one comparison principle,
the two responses as options (A) and (B), and the cue "The answer is:". The soft label is the normalised
probability of " (A)" against " (B)", read from one forward pass; `--hard` rounds it to 0 or 1. `--cot` lets
the model reason first ("Let's think step by step") and reads the answer after its reasoning; the paper
clamped such labels to 40-60%, which `--clamp` does (for any label). Principles are drawn per comparison
(`--principles-per-pair K` averages K of them), and `--debias` scores both orders and averages, cancelling the
model's preference for a slot. Output: TRL's conversational preference format plus `p_chosen` and `votes`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from caictl import __version__, model_identity, model_kind, settings
from caictl.constitution import Constitution, load_for_stage
from caictl.engines import ENGINES, sampler
from caictl.errors import InputError, UsageError
from caictl.generation import Cuts, log_servers, open_engine
from caictl.judge import Comparison, Judge, vote_statistics
from caictl.records import (
    Pairs,
    RecordWriter,
    RejectWriter,
    batches,
    read_rows,
    shard_problem,
    this_shard,
    to_pairs,
    with_upstream,
)
from caictl.ui import log, meter, print_summary, row_counts

PAIRINGS = ("first-two", "all")


@dataclass
class LabelConfig:
    pairs: str | None = None  # sample output (id, messages, responses); None or "-" reads stdin
    out: str | None = None
    model: str | None = None  # the feedback model
    engine: str = "hf"
    base_url: str | list[str] | None = None  # openai engine: server URL(s); None: CAICTL_BASE_URL, caictl.yaml
    constitution: str = "harmless"
    principles: list[str] = field(default_factory=list)  # restrict the draw to these comparison principle ids
    hard: bool = False  # 0/1 labels instead of soft probabilities
    cot: bool = False  # chain-of-thought: reason first, then read the answer probabilities
    clamp: tuple[float, float] | None = None  # clamp every probability into [lo, hi]; --cot defaults to 0.4-0.6
    principles_per_pair: int = 1  # K principles per comparison, averaged (principle ensembling)
    debias: bool = True  # score both orders and average
    few_shot: bool = False  # worked labelling examples from the constitution before the question
    pairing: str = "first-two"  # rows with more than two responses: first-two, or all pairs
    max_new_tokens: int = 256  # --cot reasoning length
    temperature: float = 1.0  # --cot reasoning sampling
    batch_size: int = 16
    concurrency: int = 8
    compile: bool | None = None  # hf engine: decoding through torch.compile; None: with CUDA only
    max_retries: int | None = None  # openai engine; None: CAICTL_MAX_RETRIES, caictl.yaml, the engine's
    timeout: float | None = None  # openai engine, seconds a request may take; None: likewise
    seed: int = 0
    limit: int | None = None
    shard: str | None = None  # "K/N": only the rows whose id hashes to part K (from 0) of N
    skip_invalid: bool = False
    overwrite: bool = False

    def check(self) -> None:
        problems = []
        if self.engine not in ENGINES:
            problems.append(f"--engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.clamp is not None:
            lo, hi = self.clamp
            if not 0 <= lo <= 0.5 <= hi <= 1:
                problems.append(f"--clamp {lo} {hi}: need 0 <= LO <= 0.5 <= HI <= 1")
        if self.hard and self.clamp is not None:
            problems.append("--hard and --clamp do not go together: a hard label is 0 or 1")
        if self.principles_per_pair < 1:
            problems.append("--principles-per-pair must be at least 1")
        if self.pairing not in PAIRINGS:
            problems.append(f"--pairs {self.pairing!r}: choose one of {', '.join(PAIRINGS)}")
        if self.batch_size < 1 or self.concurrency < 1 or self.max_new_tokens < 1:
            problems.append("--batch-size, --concurrency and --max-new-tokens must be at least 1")
        if self.limit is not None and self.limit < 1:
            problems.append("--limit must be at least 1")
        if problem := shard_problem(self.shard):
            problems.append(problem)
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def effective_clamp(self) -> tuple[float, float] | None:
        if self.clamp is None and self.cot and not self.hard:
            return (0.4, 0.6)  # the paper's clamp for chain-of-thought labels
        return self.clamp


def run(config: LabelConfig, engine=None) -> dict:
    """engine: one already made (from Python, or a test's scripted engine); by default --engine opens one."""
    config.check()
    model = engine.model if engine is not None else settings.require_model(config.model)
    if engine is None and config.engine == "hf":
        model_kind.check(model, model_kind.CAUSAL_LM, "--model")
    constitution = load_for_stage(config.constitution, config.principles, "comparison")
    rejects = RejectWriter(config.out) if config.skip_invalid else None
    comparisons = read_comparisons(config, constitution, rejects)
    if config.limit:
        comparisons = comparisons[: config.limit]  # --limit first: the N jobs of a sharded run split the same rows
    comparisons = this_shard(comparisons, config.shard, "comparisons")
    run_settings = {
        "stage": "label", "model": model, "model_identity": model_identity.identity(model, config.engine),
        "engine": config.engine, "constitution": constitution.name,
        "constitution_hash": constitution.content_hash(), "label": _kind(config),
        "clamp": list(config.effective_clamp) if config.effective_clamp else None,
        "principles_per_pair": config.principles_per_pair, "debias": config.debias, "few_shot": config.few_shot,
        "pairing": config.pairing, "seed": config.seed, "shard": config.shard, "caictl_version": __version__,
        # --cot samples its reasoning
        "sampler": sampler(config.engine) if config.cot else None,
    }
    writer = RecordWriter(config.out, run_settings, overwrite=config.overwrite)
    pending = [c for c in comparisons if c.id not in writer.done]
    if writer.done:
        log(f"resuming {config.out}: {len(comparisons) - len(pending)} of {len(comparisons)} comparisons already done")

    records: list[dict] = []
    judge = None
    cuts = Cuts("question(s) did not fit the model's context")
    start = time.perf_counter()
    try:
        if pending:
            engine = engine or open_engine(config.engine, model, config.base_url, config.batch_size,
                                           config.concurrency, config.max_retries, config.timeout, config.compile)
            judge = Judge(engine, constitution, few_shot=config.few_shot, cot=config.cot, debias=config.debias,
                          clamp=config.effective_clamp, max_new_tokens=config.max_new_tokens,
                          temperature=config.temperature, seed=config.seed)
            with meter(len(pending), "label", unit="pairs") as progress:
                for chunk in batches(pending, config.batch_size):  # written batch by batch
                    done = [to_record(c, votes, config, run_settings, cuts)
                            for c, votes in zip(chunk, judge.votes(chunk))]
                    writer.write(done)
                    records += done
                    progress.advance(len(chunk))
            log_servers(engine)
    finally:
        writer.close()
    counts = row_counts(read=len(comparisons) + (rejects.count if rejects else 0), written=len(records),
                        skipped=len(comparisons) - len(pending), rejected=rejects.count if rejects else 0,
                        seconds=time.perf_counter() - start, tokens=judge.completion_tokens if judge else 0)
    summary = summarise(records, counts, config, cuts)
    cuts.warn()
    return summary


def _kind(config: LabelConfig) -> str:
    return ("cot-" if config.cot else "") + ("hard" if config.hard else "soft")


# Input --------------------------------------------------------------------------------------------------


def read_comparisons(config: LabelConfig, constitution: Constitution, rejects) -> list[Comparison]:
    """Pairs records to comparisons, each with its principles drawn (seeded by the comparison's id)."""
    comparisons = []
    seen: dict[str, int] = {}
    for row in read_rows(config.pairs, on_invalid=rejects):
        try:
            pairs = to_pairs(row.data)
        except ValueError as error:
            if rejects is None:
                raise InputError(f"{row.where}: {error}")
            rejects(row, str(error))
            continue
        # Repeated conversations without ids (hh-rlhf has them) get distinct, still stable, ids.
        seen[pairs.id] = seen.get(pairs.id, 0) + 1
        if seen[pairs.id] > 1 and "id" not in row.data:
            pairs.id = f"{pairs.id}-{seen[pairs.id]}"
        made = _comparisons_of(pairs, config.pairing)
        for comparison in made:
            rng = random.Random(f"{config.seed}:{comparison.id}:principles")
            k = min(config.principles_per_pair, len(constitution.comparison))
            comparison.principles = rng.sample(constitution.comparison, k)
            comparison.upstream = row.data.get("meta")
            comparisons.append(comparison)
    if not comparisons:
        raise InputError(f"{config.pairs or '-'}: no pairs to label")
    return comparisons


def _comparisons_of(pairs: Pairs, pairing: str) -> list[Comparison]:
    responses, extra = pairs.responses, pairs.extra
    if pairs.human_chosen_index is not None:
        # Kept in the record, so the labels can be checked against people: chosen_index == human_chosen_index.
        extra = {**extra, "human_chosen_index": pairs.human_chosen_index}
    if pairing == "first-two" or len(responses) == 2:
        return [Comparison(pairs.id, pairs.messages, responses[0], responses[1], [], extra)]
    return [Comparison(f"{pairs.id}/{i}-{j}", pairs.messages, responses[i], responses[j], [], extra)
            for i in range(len(responses)) for j in range(i + 1, len(responses))]


# Output -------------------------------------------------------------------------------------------------


def to_record(comparison: Comparison, votes: list[dict], config: LabelConfig, run_settings: dict,
              cuts: Cuts) -> dict:
    """A preference record: the preferred response as `chosen`, with p_chosen in [0.5, 1]; meta counts the
    tokens cut from its questions to fit the model's context."""
    p_first = sum(v["p"] for v in votes) / len(votes)
    if config.hard:
        p_first = 1.0 if p_first >= 0.5 else 0.0
    first_wins = p_first >= 0.5
    chosen, rejected = (comparison.first, comparison.second) if first_wins else (comparison.second, comparison.first)
    return {
        **comparison.extra,
        "id": comparison.id,
        "prompt": comparison.messages,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "p_chosen": p_first if first_wins else 1 - p_first,
        "chosen_index": 0 if first_wins else 1,
        "votes": votes,
        "meta": with_upstream(cuts.meta({**run_settings, "principles": [v["principle"] for v in votes]},
                                        sum(v.get("truncated_tokens", 0) for v in votes)), comparison.upstream),
    }


def summarise(records: list[dict], counts: dict, config: LabelConfig, cuts: Cuts) -> dict:
    """Per principle: how many votes, mean confidence, how often both orders agree, the first-slot pull. Rows
    are comparisons: with --pairs all, a pairs row of k responses is k(k-1)/2 of them."""
    principles, overall = vote_statistics(records)
    judged = [r for r in records if "human_chosen_index" in r]
    summary = {
        "stage": "label",
        **counts,
        "out": config.out or "-",
        "label": _kind(config),
        "mean_p_chosen": round(sum(r["p_chosen"] for r in records) / len(records), 4) if records else None,
        "position_consistency": overall["position_consistency"],
        "first_slot_preference": overall["first_slot_preference"],
        # Share of the comparisons people had decided where the label picks the same response.
        "agreement_with_people": round(sum(r["chosen_index"] == r["human_chosen_index"] for r in judged)
                                       / len(judged), 4) if judged else None,
        "per_principle": principles,
        **cuts.summary(),
        "comparisons_per_s": round(len(records) / counts["seconds"], 2) if counts["seconds"] > 0 else None,
    }
    rows = [("output", summary["out"]), ("label", summary["label"]), ("mean p_chosen", summary["mean_p_chosen"]),
            ("position consistency", summary["position_consistency"]),
            ("first-slot preference", summary["first_slot_preference"]),
            ("agreement with people", f"{summary['agreement_with_people']} ({len(judged)} comparisons)"
             if judged else "-"),
            ("comparisons cut to fit the context", f"{cuts.rows} ({cuts.tokens:,} tokens)"),
            ("comparisons/s", summary["comparisons_per_s"])]
    rows += [(f"  {pid}", f"{p['votes']} votes, confidence {p['mean_confidence']}, consistency "
                          f"{p['position_consistency']}, first slot {p['first_slot_preference']}")
             for pid, p in principles.items()]
    print_summary("label", summary, rows)
    if config.out not in (None, "-"):
        Path(f"{config.out}.summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
