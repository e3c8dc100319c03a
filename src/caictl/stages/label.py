r"""label: AI preference labels. A feedback model compares two responses under a constitution principle.

    caictl label pairs.jsonl -o prefs.jsonl --model models/feedback \
        --soft --clamp 0.4 0.6

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
import time
from dataclasses import dataclass
from pathlib import Path

from caictl import __version__
from caictl.data.constitution import load_for_stage
from caictl.data.reading import shard_problem, this_shard
from caictl.data.writing import RecordWriter, RejectWriter, batches, with_upstream
from caictl.engines import sampler
from caictl.engines.generation import Cuts, engine_summary, log_servers, prompt_meta
from caictl.errors import UsageError
from caictl.feedback.judge import PairToJudge, vote_statistics
from caictl.feedback.label_options import LabelOptions, read_pairs_to_judge
from caictl.models import identity as model_identity
from caictl.options import INPUT_OUTPUT, METHOD, RUNS, common, option
from caictl.ui import log, meter, print_summary, row_counts

PAIRINGS = ("first-two", "all")


@dataclass(kw_only=True)
class LabelConfig(LabelOptions):
    pairs: str | None = option(None, "Sample output (id, messages, responses); omit or '-' to read stdin.",
                               INPUT_OUTPUT, argument=True)
    out: str | None = option(None, "Output JSONL; omitted: records go to stdout.", INPUT_OUTPUT, short="-o")
    constitution: str = common("constitution", "harmless")
    principles: list[str] = option(help="Comparison principle ids to draw from, comma-separated; unset: all.",
                                   panel=METHOD, default_factory=list, split=",", metavar="IDS")
    pairing: str = option("first-two", "Rows with more than two responses: first-two, or all pairs.", METHOD,
                          flag="--pairs")
    limit: int | None = option(None, "Only the first N comparisons.", INPUT_OUTPUT)
    shard: str | None = common("shard", None)
    skip_invalid: bool = common("skip_invalid", False)
    overwrite: bool = option(False, "Start OUT afresh instead of resuming it.", RUNS)

    def check(self) -> None:
        problems = self.label_problems()
        if self.pairing not in PAIRINGS:
            problems.append(f"--pairs {self.pairing!r}: choose one of {', '.join(PAIRINGS)}")
        if self.limit is not None and self.limit < 1:
            problems.append("--limit must be at least 1")
        if problem := shard_problem(self.shard):
            problems.append(problem)
        if problems:
            raise UsageError("; ".join(problems))


def run(config: LabelConfig, engine=None) -> dict:
    """engine: one already made (from Python, or a test's scripted engine); by default --engine opens one."""
    config.check()
    constitution = load_for_stage(config.constitution, config.principles, "comparison")
    model = config.feedback_model(engine)  # after the options: a hub id may cost a request to the hub
    rejects = RejectWriter(config.out) if config.skip_invalid else None
    comparisons = read_pairs_to_judge(config.pairs, constitution, config.principles_per_pair, config.seed,
                                      config.pairing, rejects)
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
            engine = engine or config.open_engine(model)
            writer.settle(prompt_meta(engine))
            judge = config.judge(engine, constitution, config.cot, config.debias, config.effective_clamp)
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
    summary = {**summarise(records, counts, config, cuts), **engine_summary(engine)}
    cuts.warn()
    return summary


def _kind(config: LabelConfig) -> str:
    return ("cot-" if config.cot else "") + ("hard" if config.hard else "soft")


# Output -------------------------------------------------------------------------------------------------


def to_record(comparison: PairToJudge, votes: list[dict], config: LabelConfig, run_settings: dict,
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
    rows = [("out", summary["out"]), ("label", summary["label"]), ("mean p_chosen", summary["mean_p_chosen"]),
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
