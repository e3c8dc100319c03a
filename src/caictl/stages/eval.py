"""eval: how good are a model's choices and a preference model's rewards.

    caictl eval mc ../shared/data/anthropic-evals/438HHHEvaluations.part-a.jsonl --model models/rl-cai -o eval/mc
    caictl eval pm hh-rlhf-test.jsonl.gz --pm models/pm -o eval/pm

`mc` scores multiple-choice evaluations in Anthropic's format (`prompt`, `corrects`, `incorrects`) by the
log-probability of each answer: accuracy, and calibration of the probability given to the chosen answer.
`pm` asks a preference model to rank comparisons (`text_correct`/`text_incorrect`, hh-rlhf chosen/rejected,
preference records): accuracy, mean margin, calibration. Each writes records.jsonl, summary.json,
reliability.png and report.md to the output folder.

`eval compare` (models side by side) and `eval report` (a whole run) have modules of their own: compare.py
and report.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from caictl import model_kind, settings, tokens
from caictl.errors import InputError, UsageError
from caictl.generation import Cuts
from caictl.metrics import calibration, pairwise_metrics, plot_reliability
from caictl.records import read_rows
from caictl.ui import summary_table


@dataclass
class EvalMCConfig:
    files: list[str]  # Anthropic-format multiple-choice files
    out: str  # output folder
    model: str | None = None
    batch_size: int = 16


@dataclass
class EvalPMConfig:
    files: list[str]  # comparison files
    out: str
    pm: str = ""
    batch_size: int = 32
    max_length: int = 512
    names: list[str] = field(default_factory=list)


def run_mc(config: EvalMCConfig) -> dict:
    model = settings.require_model(config.model)
    model_kind.check(model, model_kind.CAUSAL_LM, "--model")
    questions = {path: read_mc(path) for path in _existing(config.files)}
    from caictl.engines import load_engine

    engine = load_engine("hf", model, batch_size=config.batch_size)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results, records = {}, []
    cuts = Cuts("question(s) did not fit the model's context", "truncated_tokens")
    for path, rows in questions.items():
        predicted, correct = [], []
        for row in rows:
            choices = row["corrects"] + row["incorrects"]
            # The question is content: a control token written in it is read as text (caictl.tokens).
            logprobs = engine.choice_logprobs([tokens.mark(row["prompt"])], choices)[0]
            top = max(logprobs)
            probabilities = [math.exp(lp - top) for lp in logprobs]
            total = sum(probabilities)
            probabilities = [p / total for p in probabilities]
            best = max(range(len(choices)), key=lambda i: probabilities[i])
            is_correct = best < len(row["corrects"])
            predicted.append(probabilities[best])
            correct.append(1.0 if is_correct else 0.0)
            record = {"file": path, "line": row["line"], "choice": choices[best], "correct": is_correct,
                      "p_choice": probabilities[best], "p_correct": sum(probabilities[: len(row["corrects"])])}
            if cuts.count(engine.choice_cuts[0]):
                record[cuts.key] = engine.choice_cuts[0]
            records.append(record)
        ece, bins = calibration(predicted, correct)
        results[path] = {"questions": len(rows), "accuracy": round(sum(correct) / len(correct), 4),
                         "ece": round(ece, 4), "truncated_questions": sum(r.get(cuts.key, 0) > 0 for r in records
                                                                          if r["file"] == path),
                         "reliability": bins}
    cuts.warn()
    return _write(out, "eval mc", {"model": model}, results, records)


def run_pm(config: EvalPMConfig) -> dict:
    from caictl.pm import Scorer, comparison_of

    model_kind.check(config.pm, model_kind.SEQ_CLS, "--pm")
    comparisons = {}
    for path in _existing(config.files):
        rows = []
        for row in read_rows(path):
            try:
                rows.append(comparison_of(row.data))
            except ValueError as error:
                raise InputError(f"{row.where}: {error}")
        comparisons[path] = rows
    scorer = Scorer(config.pm, max_length=config.max_length, batch_size=config.batch_size)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results, records, cuts = {}, [], scorer.cuts()
    for path, rows in comparisons.items():
        texts = [t for c in rows for t in (c.chosen, c.rejected)]
        rewards, cut = scorer.score(texts), scorer.cut_tokens(texts)
        differences = [rewards[2 * i] - rewards[2 * i + 1] for i in range(len(rows))]
        for i, (d, c) in enumerate(zip(differences, rows)):
            record = {"file": path, "index": i, "reward_chosen": rewards[2 * i], "reward_rejected": rewards[2 * i + 1],
                      "correct": (d > 0) == (c.p >= 0.5)}
            if cuts.count(cut[2 * i] + cut[2 * i + 1]):
                record[cuts.key] = cut[2 * i] + cut[2 * i + 1]
            records.append(record)
        results[path] = {**pairwise_metrics(differences, [c.p for c in rows]),
                         "truncated_pairs": sum(cut[2 * i] + cut[2 * i + 1] > 0 for i in range(len(rows)))}
    cuts.warn()
    return _write(out, "eval pm", {"pm": config.pm}, results, records)


def read_mc(path: str) -> list[dict]:
    rows = []
    for row in read_rows(path):
        data = row.data
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) \
                or not data.get("corrects") or not data.get("incorrects"):
            raise InputError(f"{row.where}: a multiple-choice row needs 'prompt', 'corrects' and 'incorrects'")
        rows.append({"line": row.line, "prompt": data["prompt"], "corrects": list(data["corrects"]),
                     "incorrects": list(data["incorrects"])})
    if not rows:
        raise InputError(f"{path}: no questions")
    return rows


def _existing(files: list[str]) -> list[str]:
    missing = [f for f in files if not Path(f).exists()]
    if missing or not files:
        raise UsageError(f"{', '.join(missing) or 'no input files'}: no such file")
    return files


def _write(out: Path, title: str, subject: dict, results: dict, records: list[dict]) -> dict:
    with open(out / "records.jsonl", "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary = {**subject, "files": {p: {k: v for k, v in r.items() if k != "reliability"} for p, r in results.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_reliability(results, out / "reliability.png")
    columns = [k for k in next(iter(summary["files"].values()))]
    lines = [f"# caictl {title}", "", f"{', '.join(f'{k}: `{v}`' for k, v in subject.items())}", "",
             "| file | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {Path(p).name} | " + " | ".join(str(r[c]) for c in columns) + " |"
              for p, r in summary["files"].items()]
    lines += ["", "![reliability](reliability.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    summary_table(title, [(Path(p).name, ", ".join(f"{k} {v}" for k, v in r.items()))
                          for p, r in summary["files"].items()]
                  + [("report", out / "report.md")])
    return summary
