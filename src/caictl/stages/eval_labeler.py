r"""eval labeler: how far a feedback model's labels agree with people's, and which way it leans.

    caictl eval labeler hh-rlhf/harmless-base-test.jsonl.gz \
        anthropic-evals/438HHHEvaluations.jsonl \
        --model models/feedback -o eval/labeler

CAI's labels replace people's, so the labeller is worth measuring against people before it labels anything: the
paper (section 4.1) found soft labels well calibrated and chain-of-thought labels over-confident, hence its
40-60% clamp. The labeller here is `caictl label`'s, with the same options (constitution, --principles,
--principles-per-pair or --all-principles, --few-shot, --cot, --clamp, --debias, --hard) and the same principle
draw, run on comparisons people made: hh-rlhf chosen/rejected rows, Anthropic's HHH rows (text_correct /
text_incorrect: the conversation is their common part up to its last "\\n\\nAssistant:"), prompt/chosen/rejected
rows. The people's choice is the first response (slot A in the first order) for about half the comparisons, by
a hash of the row's id, so that a pull towards one slot cannot pass for agreement.

Per file, overall and per principle (caictl.feedback.agreement): accuracy (agreement with people; a tie counts half)
with a bootstrap 95% interval over comparisons; ECE of P(people's choice) and a reliability plot; position bias (both
orders are always scored, whatever --debias says of the label): the share of comparisons whose choice flips when
the responses swap slots, and the mean P(slot A wins) (0.5: no pull); length bias: how often the labeller
prefers the longer response (in words), against how often people did. `--compare-modes` labels four ways side
by side from two scoring passes: soft, hard, cot and cot-clamp (--clamp, else the paper's 0.4-0.6).

Output folder: records.jsonl (one row per comparison: the responses, the people's choice, the votes of each
scoring pass, each mode's P(first); written batch by batch, and a re-run resumes it), summary.json, report.md,
reliability.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from caictl import __version__
from caictl.data.constitution import Constitution, load_for_stage
from caictl.data.reading import read_rows
from caictl.data.writing import RecordWriter, batches
from caictl.engines import sampler
from caictl.engines.generation import Cuts, engine_summary, log_servers, prompt_meta
from caictl.errors import InputError, UsageError
from caictl.evaluation.markdown import number, random_weights_warning, table
from caictl.evaluation.metrics import plot_reliability
from caictl.feedback.agreement import Judged, Mode, label_probability, measure
from caictl.feedback.judge import Judge, PairToJudge
from caictl.feedback.label_options import PAPER_COT_CLAMP, LabelOptions, read_pairs_to_judge
from caictl.models import identity as model_identity
from caictl.options import INPUT_OUTPUT, METHOD, RUNS, common, option
from caictl.ui import meter, print_summary, row_counts

# Which votes a mode reads: its own scoring pass.
PASSES = {False: "votes", True: "cot_votes"}


@dataclass(kw_only=True)
class EvalLabelerConfig(LabelOptions):
    files: list[str] = option(help="Comparisons people made: hh-rlhf chosen/rejected, HHH text_correct/"
                                   "text_incorrect, prompt/chosen/rejected.", panel=INPUT_OUTPUT, argument=True)
    out: str = option(help="Output folder.", panel=INPUT_OUTPUT, short="-o")
    constitution: str = common("constitution", "harmless")
    principles: list[str] = option(help="Comparison principle ids to draw from, comma-separated; unset: all.",
                                   panel=METHOD, default_factory=list, split=",", metavar="IDS")
    all_principles: bool = option(False, "Every principle votes on every comparison, instead of K drawn "
                                         "(per-principle figures on all of them).", METHOD)
    compare_modes: bool = option(False, "Soft, hard, cot and cot-clamp labels side by side.", METHOD)
    limit: int | None = option(None, "At most N comparisons per file, from the top.", INPUT_OUTPUT)
    overwrite: bool = option(False, "Start afresh instead of resuming.", RUNS)

    def check(self) -> None:
        problems = self.label_problems()
        if not self.files:
            problems.append("give at least one comparison file")
        problems += [f"{path}: no such file" for path in self.files if not Path(path).is_file()]
        names = [Path(path).name for path in self.files]
        problems += [f"{name}: two input files have this name; records are keyed by it, so rename one"
                     for name in sorted({n for n in names if names.count(n) > 1})]
        if self.compare_modes and (self.hard or self.cot):
            problems.append("--compare-modes labels soft, hard, cot and cot-clamp itself: leave out --hard and --cot")
        if self.all_principles and self.principles_per_pair != LabelOptions.principles_per_pair:
            problems.append("--all-principles and --principles-per-pair do not go together: give one")
        if self.limit is not None and self.limit < 1:
            problems.append("--limit must be at least 1")
        if problems:
            raise UsageError("; ".join(problems))

    def modes(self) -> list[Mode]:
        if self.compare_modes:
            return [Mode("soft", debias=self.debias), Mode("hard", hard=True, debias=self.debias),
                    Mode("cot", cot=True, debias=self.debias),
                    Mode("cot-clamp", cot=True, clamp=self.clamp or PAPER_COT_CLAMP, debias=self.debias)]
        bounds = self.effective_clamp
        parts = [name for name, on in (("cot", self.cot), ("hard", self.hard), ("clamp", bounds)) if on]
        return [Mode("-".join(parts) or "soft", self.cot, self.hard, bounds, self.debias)]


def run(config: EvalLabelerConfig, engine=None) -> dict:
    """engine: one already made (from Python, or a test's scripted engine); by default --engine opens one."""
    config.check()
    model = config.feedback_model(engine)
    constitution = load_for_stage(config.constitution, config.principles, "comparison")
    modes = config.modes()
    comparisons = {path: read_judged(config, path, constitution) for path in config.files}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    passes = sorted({mode.cot for mode in modes})
    run_settings = {
        "stage": "eval labeler", "model": model, "model_identity": model_identity.identity(model, config.engine),
        "engine": config.engine, "constitution": constitution.name,
        "constitution_hash": constitution.content_hash(),
        "principles_per_pair": "all" if config.all_principles else config.principles_per_pair,
        "few_shot": config.few_shot, "modes": [asdict(mode) for mode in modes], "seed": config.seed,
        "sampler": sampler(config.engine) if True in passes else None,
        "cot_reasoning": [config.max_new_tokens, config.temperature] if True in passes else None,
        "caictl_version": __version__,
    }
    writer = RecordWriter(out / "records.jsonl", run_settings, overwrite=config.overwrite)
    pending = [(path, c) for path, cs in comparisons.items() for c in cs if record_id(path, c) not in writer.done]
    total = sum(len(cs) for cs in comparisons.values())
    judges: dict[bool, Judge] = {}
    cuts = Cuts("label question(s) did not fit the model's context")
    start = time.perf_counter()
    try:
        if pending:
            engine = engine or config.open_engine(model)
            writer.settle(prompt_meta(engine))
            # Both orders always, and no clamp: each mode's label is rebuilt from the probabilities as read.
            judges = {cot: config.judge(engine, constitution, cot, debias=True, clamp=None) for cot in passes}
            with meter(len(pending), "eval labeler", unit="comparisons") as progress:
                for chunk in batches(pending, config.batch_size):  # written batch by batch
                    votes = {cot: judge.votes([c for _, c in chunk]) for cot, judge in judges.items()}
                    writer.write([to_record(path, c, {PASSES[cot]: votes[cot][i] for cot in passes}, modes,
                                            run_settings, cuts)
                                  for i, (path, c) in enumerate(chunk)])
                    progress.advance(len(chunk), sum(j.completion_tokens for j in judges.values()) - progress.tokens)
            log_servers(engine)
    finally:
        writer.close()
    cuts.warn()
    records = read_records(out / "records.jsonl", comparisons)
    counts = row_counts(read=total, written=len(pending), skipped=total - len(pending),
                        seconds=time.perf_counter() - start,
                        tokens=sum(j.completion_tokens for j in judges.values()))
    counts.update(engine_summary(engine))
    return write_outputs(out, summarise(config, model, constitution, modes, records, counts))


def read_judged(config: EvalLabelerConfig, path: str, constitution: Constitution) -> list[PairToJudge]:
    """A file's comparisons as `caictl label` reads them, each with its principles drawn; every one must carry the
    people's choice. Checked before any model loads."""
    drawn = len(constitution.comparison) if config.all_principles else config.principles_per_pair
    comparisons = read_pairs_to_judge(path, constitution, drawn, config.seed)[: config.limit]
    unlabelled = next((c for c in comparisons if "human_chosen_index" not in c.extra), None)
    if unlabelled is not None:
        raise InputError(f"{path}: comparison {unlabelled.id} carries no choice by a person; eval labeler needs "
                         "comparisons people made: hh-rlhf chosen/rejected rows, HHH rows (text_correct / "
                         "text_incorrect) or prompt/chosen/rejected rows")
    return comparisons


def record_id(path: str, comparison: PairToJudge) -> str:
    return f"{Path(path).name}/{comparison.id}"


def to_record(path: str, comparison: PairToJudge, votes: dict[str, list[dict]], modes: list[Mode],
              run_settings: dict, cuts: Cuts) -> dict:
    """One comparison: the responses in their first order, which one people chose, the votes of each scoring pass
    (p_ab and p_ba as read), and each mode's P(first response better)."""
    truncated = sum(v.get("truncated_tokens", 0) for pass_votes in votes.values() for v in pass_votes)
    return {
        "id": record_id(path, comparison), "file": path, "comparison_id": comparison.id,
        "prompt": comparison.messages, "responses": [comparison.first, comparison.second],
        "human_chosen_index": comparison.extra["human_chosen_index"],
        **votes,
        "p_first": {mode.name: round(label_probability(votes[PASSES[mode.cot]], mode), 6) for mode in modes},
        "meta": cuts.meta(run_settings, truncated),
    }


def read_records(path: Path, comparisons: dict[str, list[PairToJudge]]) -> dict[str, list[dict]]:
    """Per input file, the records of its comparisons in input order: this run's and a resumed run's."""
    by_id = {row.data["id"]: row.data for row in read_rows(path)}
    return {file: [by_id[record_id(file, c)] for c in cs] for file, cs in comparisons.items()}


# Summary and report -------------------------------------------------------------------------------------


def summarise(config: EvalLabelerConfig, model: str, constitution: Constitution, modes: list[Mode],
              records: dict[str, list[dict]], counts: dict) -> dict:
    files = {}
    for path, rows in records.items():
        by_mode = {}
        for mode in modes:
            judged = [Judged(r[PASSES[mode.cot]], r["responses"][0], r["responses"][1], r["human_chosen_index"])
                      for r in rows]
            by_mode[mode.name] = measure(judged, mode, config.seed)
        files[path] = {"comparisons": len(rows),
                       "people_choice_first": sum(r["human_chosen_index"] == 0 for r in rows),
                       "truncated_comparisons": sum("truncated_tokens" in r["meta"] for r in rows),
                       "modes": by_mode}
    return {"stage": "eval labeler", **counts, "model": model, "engine": config.engine,
            "constitution": constitution.name, "constitution_hash": constitution.content_hash(),
            "principles": "all" if config.all_principles else f"{config.principles_per_pair} drawn per comparison",
            "few_shot": config.few_shot, "debias": config.debias, "seed": config.seed,
            "modes": {mode.name: {"cot": mode.cot, "hard": mode.hard, "clamp": list(mode.clamp) if mode.clamp else None}
                      for mode in modes},
            "files": files, "caictl_version": __version__}


def write_outputs(out: Path, summary: dict) -> dict:
    """reliability.png from the summary's bins; summary.json and report.md without them; the summary as written."""
    curves = {f"{Path(path).name} {mode}": result["overall"]
              for path, entry in summary["files"].items() for mode, result in entry["modes"].items()}
    plot_reliability(curves, out / "reliability.png", xlabel="labeller's P(response)",
                     ylabel="share people chose it")
    without_bins = _without_reliability(summary)
    (out / "summary.json").write_text(json.dumps(without_bins, indent=2) + "\n")
    (out / "report.md").write_text(report(without_bins))
    rows = []
    for path, entry in without_bins["files"].items():
        for mode, result in entry["modes"].items():
            rows.append((f"{Path(path).name} / {mode}", one_line(result["overall"])))
    print_summary("eval labeler", without_bins, rows + [("report", out / "report.md")])
    return without_bins


def _without_reliability(value):
    if isinstance(value, dict):
        return {k: _without_reliability(v) for k, v in value.items() if k != "reliability"}
    return value


def one_line(s: dict) -> str:
    return (f"accuracy {number(s['accuracy'])} ({number(s['accuracy_ci'][0])}-{number(s['accuracy_ci'][1])}), "
            f"ECE {number(s['ece'])}, position flips {number(s['position_flip_rate'])}, "
            f"slot A {number(s['slot_a_preference'])}, "
            f"prefers longer {number(s['longer_preferred'])} (people {number(s['human_longer_preferred'])})")


COLUMNS = ["accuracy (95% CI)", "ECE", "position flip rate", "slot A preference", "prefers longer",
           "people prefer longer"]


def _cells(s: dict) -> list[str]:
    return [f"{number(s['accuracy'])} ({number(s['accuracy_ci'][0])}-{number(s['accuracy_ci'][1])})", number(s["ece"]),
            number(s["position_flip_rate"]), number(s["slot_a_preference"]), number(s["longer_preferred"]),
            f"{number(s['human_longer_preferred'])} (of {s['length_compared']})"]


def report(summary: dict) -> str:
    modes = ", ".join(f"`{name}`" + (f" (clamp {m['clamp'][0]}-{m['clamp'][1]})" if m["clamp"] else "")
                      for name, m in summary["modes"].items())
    lines = ["# caictl eval labeler", "", *random_weights_warning([summary["model"]]),
             f"Feedback model `{summary['model']}` ({summary['engine']}), constitution `{summary['constitution']}` "
             f"({summary['constitution_hash']}), principles: {summary['principles']}, few-shot: "
             f"{'yes' if summary['few_shot'] else 'no'}, label from both orders averaged: "
             f"{'yes' if summary['debias'] else 'no'}. Modes: {modes}.", "",
             "Accuracy: agreement with the people's choice (a tie counts half), with a bootstrap 95% interval over "
             "comparisons. ECE: calibration of P(people's choice), each comparison counted from both sides. Position "
             "flip rate: share of comparisons whose choice changes when the two responses swap slots. Slot A "
             "preference: mean P(slot A wins) over both orders (0.5: no pull). Prefers longer: how often the "
             "labeller picks the response with more words, against how often people did, over the comparisons "
             "whose responses differ in length.", ""]
    for path, entry in summary["files"].items():
        lines += [f"## {Path(path).name}", "",
                  f"`{path}`: {entry['comparisons']} comparisons; the people's choice is the first response in "
                  f"{entry['people_choice_first']} of them; {entry['truncated_comparisons']} cut to fit the model's "
                  "context.", ""]
        lines += table(["mode", *COLUMNS], [[mode, *_cells(r["overall"])] for mode, r in entry["modes"].items()])
        for mode, result in entry["modes"].items():
            lines += [f"Per principle ({mode}):", ""]
            lines += table(["principle", "comparisons", *COLUMNS],
                           [[pid, s["comparisons"], *_cells(s)] for pid, s in result["per_principle"].items()])
    lines += ["![reliability](reliability.png)", ""]
    return "\n".join(lines)
