r"""constitution diff: what changing the constitution does to the labels, before a PM is trained on them.

    caictl constitution diff harmless mine.yaml pairs.jsonl \
        --model models/feedback -o eval/diff
    caictl constitution diff harmless:least-harmful \
        harmless:not-preachy,engaged-not-evasive \
        ../shared/data/hh-rlhf/harmless-base-test.part-a.jsonl.gz \
        --model models/feedback -o eval/diff --limit 50

The same pairs are labelled as `caictl label` labels them, under constitution A and under constitution B, with
the same options (--principles-per-pair or --all-principles, --few-shot, --cot, --clamp, --debias, --hard) and the
same principle draw. A and B are each a shipped name or file(s), or `NAME:id1,id2` for those comparison
principles of it alone. Reported (caictl.feedback.agreement):
- flip rate: the share of pairs whose preferred response differs between A and B (a tie against a choice
  counts half);
- mean shift in P(chosen): B's probability of the response A chose, minus A's; and the mean absolute change
  of P(first response better);
- per principle of each side: the share of its votes that disagree with the other side's label, which says
  which principles make the difference;
- where the pairs carry people's choices (hh-rlhf, HHH, prompt/chosen/rejected rows): agreement with people
  under each, with bootstrap intervals.
`--train-pm --heldout FILE` trains a PM on each labelling (`caictl train-pm` with its defaults; backbone
--pm-model, else the feedback model) and compares their accuracy and ECE on a held-out file of comparisons
people made, as `caictl eval pm` measures them.

Output folder: records.jsonl (one row per pair: both sides' votes and P(first); written batch by batch, and a
re-run resumes it), summary.json, report.md; with --train-pm, labels-a.jsonl and labels-b.jsonl (preference
records) and the PMs trained on them, pm-a/ and pm-b/ (trained again at every run).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from caictl import __version__
from caictl.data.constitution import Constitution, load_for_stage
from caictl.data.reading import read_rows
from caictl.data.writing import RecordWriter, batches
from caictl.engines import sampler
from caictl.engines.generation import Cuts, engine_summary, log_servers, prompt_meta
from caictl.errors import CaictlError, UsageError
from caictl.evaluation.markdown import number, random_weights_warning
from caictl.evaluation.ratings import mean_interval
from caictl.feedback.agreement import Mode, label_probability, side
from caictl.feedback.judge import Judge, PairToJudge
from caictl.feedback.label_options import LabelOptions, read_pairs_to_judge
from caictl.models import identity as model_identity
from caictl.options import INPUT_OUTPUT, METHOD, MODEL_ENGINE, RUNS, option
from caictl.ui import log, meter, print_summary, row_counts

SIDES = ("a", "b")


@dataclass(kw_only=True)
class ConstitutionDiffConfig(LabelOptions):
    a: str = option(help="Constitution A: shipped name or file(s), or NAME:id1,id2 (those comparison principles "
                         "of it).", panel=INPUT_OUTPUT, argument=True)
    b: str = option(help="Constitution B, likewise.", panel=INPUT_OUTPUT, argument=True)
    pairs: str = option(help="Pairs to label (a file): sample output, or comparisons people made (hh-rlhf, HHH, "
                             "prompt/chosen/rejected).", panel=INPUT_OUTPUT, argument=True)
    out: str = option(help="Output folder.", panel=INPUT_OUTPUT, short="-o")
    all_principles: bool = option(False, "Every principle of a side votes on every pair, instead of K drawn.",
                                  METHOD)
    limit: int | None = option(None, "Only the first N pairs.", INPUT_OUTPUT)
    train_pm: bool = option(False, "Train a PM on each labelling (train-pm's defaults) and compare them on "
                                   "--heldout.", METHOD)
    heldout: str | None = option(None, "Comparisons people made, for the PMs of --train-pm.", INPUT_OUTPUT)
    pm_model: str | None = option(None, "The PMs' backbone; unset: the feedback model.", MODEL_ENGINE)
    overwrite: bool = option(False, "Label afresh instead of resuming.", RUNS)

    def check(self) -> None:
        problems = self.label_problems()
        if not Path(self.pairs).is_file():
            problems.append(f"{self.pairs}: no such file (PAIRS is read once per constitution: a file, not stdin)")
        if self.all_principles and self.principles_per_pair != LabelOptions.principles_per_pair:
            problems.append("--all-principles and --principles-per-pair do not go together: give one")
        if self.limit is not None and self.limit < 1:
            problems.append("--limit must be at least 1")
        if self.train_pm != (self.heldout is not None):
            problems.append("--train-pm and --heldout FILE go together: the PMs are compared on the held-out file")
        if self.heldout is not None and not Path(self.heldout).is_file():
            problems.append(f"--heldout {self.heldout}: no such file")
        if problems:
            raise UsageError("; ".join(problems))

    def comparisons(self, constitution: Constitution) -> list[PairToJudge]:
        """The pairs as `caictl label` reads them, principles drawn from `constitution` (every one of them with
        --all-principles)."""
        drawn = len(constitution.comparison) if self.all_principles else self.principles_per_pair
        return read_pairs_to_judge(self.pairs, constitution, drawn, self.seed)[: self.limit]

    def mode(self) -> Mode:
        return Mode("label", self.cot, self.hard, self.effective_clamp, self.debias)


def run(config: ConstitutionDiffConfig, engine=None) -> dict:
    """engine: one already made (from Python, or a test's scripted engine); by default --engine opens one."""
    config.check()
    model = config.feedback_model(engine)
    constitutions = {name: load_side(spec) for name, spec in zip(SIDES, (config.a, config.b))}
    pairs = {name: config.comparisons(c) for name, c in constitutions.items()}
    mode = config.mode()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    run_settings = {
        "stage": "constitution diff", "model": model, "model_identity": model_identity.identity(model, config.engine),
        "engine": config.engine, "a": config.a, "a_hash": constitutions["a"].content_hash(), "b": config.b,
        "b_hash": constitutions["b"].content_hash(),
        "principles_per_pair": "all" if config.all_principles else config.principles_per_pair,
        "few_shot": config.few_shot, "mode": asdict(mode), "seed": config.seed,
        "sampler": sampler(config.engine) if config.cot else None, "caictl_version": __version__,
    }
    writer = RecordWriter(out / "records.jsonl", run_settings, overwrite=config.overwrite)
    pending = [i for i, c in enumerate(pairs["a"]) if c.id not in writer.done]
    judges: dict[str, Judge] = {}
    cuts = Cuts("label question(s) did not fit the model's context")
    start = time.perf_counter()
    try:
        if pending:
            engine = engine or config.open_engine(model)
            writer.settle(prompt_meta(engine))
            # No clamp in the judge: the label is rebuilt from the probabilities as read (caictl.feedback.agreement).
            judges = {name: config.judge(engine, c, config.cot, config.debias, clamp=None)
                      for name, c in constitutions.items()}
            with meter(len(pending), "constitution diff", unit="pairs") as progress:
                for chunk in batches(pending, config.batch_size):  # written batch by batch
                    votes = {name: judge.votes([pairs[name][i] for i in chunk]) for name, judge in judges.items()}
                    writer.write([to_record(pairs["a"][i], votes["a"][k], votes["b"][k], mode, run_settings, cuts)
                                  for k, i in enumerate(chunk)])
                    progress.advance(len(chunk))
            log_servers(engine)
    finally:
        writer.close()
    cuts.warn()
    by_id = {row.data["id"]: row.data for row in read_rows(out / "records.jsonl")}
    records = [by_id[c.id] for c in pairs["a"]]
    counts = row_counts(read=len(records), written=len(pending), skipped=len(records) - len(pending),
                        seconds=time.perf_counter() - start,
                        tokens=sum(j.completion_tokens for j in judges.values()))
    summary = {"stage": "constitution diff", **counts, "model": model, "engine": config.engine,
               **engine_summary(engine),
               "pairs": config.pairs, "mode": {"cot": mode.cot, "hard": mode.hard, "debias": mode.debias,
                                               "clamp": list(mode.clamp) if mode.clamp else None},
               **{name: {"spec": spec, "name": constitutions[name].name,
                         "hash": constitutions[name].content_hash(),
                         "principles": [p.id for p in constitutions[name].comparison]}
                  for name, spec in zip(SIDES, (config.a, config.b))},
               **compare_labellings(records, mode, config.seed),
               "pm": train_pms(config, model, out, pairs["a"], records, mode) if config.train_pm else None,
               "caictl_version": __version__}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(report(summary))
    print_summary("constitution diff", summary, terminal_rows(summary) + [("report", out / "report.md")])
    return summary


def load_side(spec: str) -> Constitution:
    """A constitution by name or file(s), or NAME:id1,id2: those of its comparison principles alone."""
    name, ids = parse_side(spec)
    constitution = load_for_stage(name, ids, "comparison")
    kept = {p.id for p in constitution.comparison}
    # restrict() keeps every comparison principle when the ids name critique principles only.
    others = [i for i in ids if i not in kept]
    if others:
        raise UsageError(f"{spec}: {', '.join(others)} name(s) no comparison principle of {name}; see "
                         f"`caictl constitution show {name}`")
    return constitution


def parse_side(spec: str) -> tuple[str, list[str]]:
    """NAME:id1,id2 as (NAME, [id1, id2]); a spec without a subset, or a file whose name holds a colon, whole."""
    head, colon, tail = spec.rpartition(":")
    if not colon or not head or not tail or "/" in tail or Path(spec).exists():
        return spec, []
    return head, [part.strip() for part in tail.split(",") if part.strip()]


def to_record(comparison: PairToJudge, votes_a: list[dict], votes_b: list[dict], mode: Mode, run_settings: dict,
              cuts: Cuts) -> dict:
    """One pair: the responses in their first order, the people's choice where the row has one, each side's
    votes (p_ab and p_ba as read) and label P(first response better)."""
    truncated = sum(v.get("truncated_tokens", 0) for v in votes_a + votes_b)
    human = comparison.extra.get("human_chosen_index")
    return {"id": comparison.id, "prompt": comparison.messages, "responses": [comparison.first, comparison.second],
            **({"human_chosen_index": human} if human is not None else {}),
            "votes_a": votes_a, "votes_b": votes_b,
            "p_first_a": round(label_probability(votes_a, mode), 6),
            "p_first_b": round(label_probability(votes_b, mode), 6),
            "meta": cuts.meta(run_settings, truncated)}


def compare_labellings(records: list[dict], mode: Mode, seed: int) -> dict:
    """Flip rate, shift in P(chosen), per-principle disagreement with the other side's label, agreement with
    people under each side."""
    flips, shifts, moves = [], [], []
    disagree: dict[str, dict[str, list[float]]] = {name: {} for name in SIDES}
    people: dict[str, list[float]] = {name: [] for name in SIDES}
    for record in records:
        q = {name: label_probability(record[f"votes_{name}"], mode) for name in SIDES}
        flips.append(abs(side(q["a"]) - side(q["b"])))
        a_chose_first = q["a"] >= 0.5  # the response A's label calls chosen, as caictl label picks it
        shifts.append((q["b"] - q["a"]) if a_chose_first else (q["a"] - q["b"]))
        moves.append(abs(q["b"] - q["a"]))
        for name, other in (("a", q["b"]), ("b", q["a"])):
            for vote in record[f"votes_{name}"]:
                disagree[name].setdefault(vote["principle"], []).append(
                    abs(side(label_probability([vote], mode)) - side(other)))
        if "human_chosen_index" in record:
            for name in SIDES:
                people[name].append(side(q[name] if record["human_chosen_index"] == 0 else 1 - q[name]))
    judged = len(people["a"])
    return {
        "comparisons": len(records),
        "flip_rate": _mean(flips),
        "mean_shift_p_chosen": _mean(shifts),
        "mean_abs_shift_p_first": _mean(moves),
        "per_principle": {name: {pid: {"votes": len(values), "disagreement": _mean(values)}
                                 for pid, values in sorted(disagree[name].items())} for name in SIDES},
        "people": {"comparisons": judged,
                   **{name: {"accuracy": _mean(people[name]),
                             "accuracy_ci": [round(x, 4) for x in mean_interval(people[name], seed)]}
                      for name in SIDES}} if judged else None,
    }


def train_pms(config: ConstitutionDiffConfig, model: str, out: Path, comparisons: list[PairToJudge],
              records: list[dict], mode: Mode) -> dict:
    """A PM trained on each side's labels by `caictl train-pm` (its defaults), measured on --heldout. Run as the
    command a user would type, so the two stages meet only through the labels file and the PM folder."""
    backbone = config.pm_model or model
    result = {"heldout": config.heldout, "backbone": backbone}
    for name in SIDES:
        labels, pm = out / f"labels-{name}.jsonl", out / f"pm-{name}"
        with open(labels, "w", encoding="utf-8") as handle:
            for comparison, record in zip(comparisons, records):
                handle.write(json.dumps(preference(comparison, record[f"p_first_{name}"]), ensure_ascii=False) + "\n")
        # Trained afresh each run: the labels it learns from are this run's.
        command = ["train-pm", str(labels), "-o", str(pm), "--model", backbone, "--eval", config.heldout,
                   "--seed", str(config.seed), "--overwrite"]
        log(f"constitution {name.upper()}: caictl {' '.join(command)}")
        finished = subprocess.run([sys.executable, "-m", "caictl", *command])
        if finished.returncode != 0:
            raise CaictlError(f"caictl train-pm on {labels} failed (exit {finished.returncode}; its error is above); "
                              "the labels stay in that file")
        metrics = json.loads((pm / "caictl.json").read_text())["metrics"]
        result[name] = metrics["eval"][config.heldout]
    return result


def preference(comparison: PairToJudge, p_first: float) -> dict:
    """A label record (caictl label's fields that train-pm reads): the preferred response as `chosen`."""
    first_wins = p_first >= 0.5
    chosen, rejected = ((comparison.first, comparison.second) if first_wins
                        else (comparison.second, comparison.first))
    return {"id": comparison.id, "prompt": comparison.messages, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "p_chosen": p_first if first_wins else 1 - p_first, "chosen_index": 0 if first_wins else 1}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


# Report -------------------------------------------------------------------------------------------------


def report(summary: dict) -> str:
    a, b = summary["a"], summary["b"]
    lines = ["# caictl constitution diff", "", *random_weights_warning([summary["model"]]),
             f"Pairs `{summary['pairs']}` ({summary['comparisons']}), feedback model `{summary['model']}` "
             f"({summary['engine']}). A: `{a['spec']}` ({a['hash']}, {len(a['principles'])} comparison principles); "
             f"B: `{b['spec']}` ({b['hash']}, {len(b['principles'])}).", "",
             "| measure | value |", "|---|---|",
             f"| flip rate (preferred response differs) | {number(summary['flip_rate'])} |",
             f"| mean shift in P(chosen), B - A, for A's choice | {_signed(summary['mean_shift_p_chosen'])} |",
             f"| mean absolute change of P(first) | {number(summary['mean_abs_shift_p_first'])} |"]
    if summary["people"]:
        for name in SIDES:
            s = summary["people"][name]
            lines.append(f"| agreement with people under {name.upper()} ({summary['people']['comparisons']} "
                         f"comparisons) | {number(s['accuracy'])} ({number(s['accuracy_ci'][0])}-"
                         f"{number(s['accuracy_ci'][1])}) |")
    if summary["pm"]:
        pm = summary["pm"]
        for name in SIDES:
            lines.append(f"| PM trained on {name.upper()}'s labels, on `{pm['heldout']}` | accuracy "
                         f"{number(pm[name]['accuracy'])}, ECE {number(pm[name]['ece'])} "
                         f"({pm[name]['comparisons']} comparisons) |")
    lines.append("")
    for name in SIDES:
        lines += [f"## Principles of {name.upper()}: share of their votes that disagree with "
                  f"{'B' if name == 'a' else 'A'}'s label", "", "| principle | votes | disagreement |", "|---|---|---|"]
        lines += [f"| {pid} | {p['votes']} | {number(p['disagreement'])} |"
                  for pid, p in summary["per_principle"][name].items()]
        lines.append("")
    return "\n".join(lines)


def terminal_rows(summary: dict) -> list[tuple[str, object]]:
    rows = [("A", summary["a"]["spec"]), ("B", summary["b"]["spec"]), ("flip rate", number(summary["flip_rate"])),
            ("mean shift in P(chosen)", _signed(summary["mean_shift_p_chosen"])),
            ("mean |change| of P(first)", number(summary["mean_abs_shift_p_first"]))]
    if summary["people"]:
        rows += [(f"agreement with people, {name.upper()}", f"{number(summary['people'][name]['accuracy'])} "
                  f"({summary['people']['comparisons']} comparisons)") for name in SIDES]
    if summary["pm"]:
        rows += [(f"PM on {name.upper()}'s labels, held out", f"accuracy {number(summary['pm'][name]['accuracy'])}, "
                  f"ECE {number(summary['pm'][name]['ece'])}") for name in SIDES]
    for name in SIDES:
        rows += [(f"  {name.upper()} {pid}", f"{p['votes']} votes, disagreement {number(p['disagreement'])}")
                 for pid, p in summary["per_principle"][name].items()]
    return rows


def _signed(value) -> str:
    return "-" if value is None else f"{value:+.3f}"
