r"""eval mc: how good are a model's choices on multiple-choice evaluations.

    caictl eval mc 438HHHEvaluations.jsonl \
        --model models/rl-cai -o eval/mc

Scores multiple-choice evaluations in Anthropic's format (`prompt`, `corrects`, `incorrects`) by the
log-probability of each answer, through any engine that scores (hf, or a server that echoes prompt log-probs):
accuracy, and calibration of the probability given to the chosen answer. When several best choices tie, the
question earns the share of them that is correct (half, for a correct and an incorrect answer). Writes
records.jsonl, summary.json, reliability.png and report.md to the output folder.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from caictl import settings
from caictl.data import control_text as tokens
from caictl.data.reading import read_rows
from caictl.engines import ENGINES
from caictl.engines.generation import Cuts, engine_summary, log_servers, open_engine
from caictl.errors import InputError, UsageError
from caictl.evaluation.metrics import calibration
from caictl.evaluation.ratings import tied
from caictl.evaluation.results import existing_files, write_results
from caictl.models import kind as model_kind
from caictl.options import INPUT_OUTPUT, MODEL_ENGINE, common, option
from caictl.ui import meter, row_counts


@dataclass
class EvalMCConfig:
    files: list[str] = option(help="Multiple-choice files in Anthropic's format: prompt, corrects, incorrects.",
                              panel=INPUT_OUTPUT, argument=True)
    out: str = option(help="Output folder.", panel=INPUT_OUTPUT, short="-o")
    model: str | None = common("model", None)
    engine: str = common("engine", "hf", help="hf, or openai: a server that echoes prompt log-probs (vLLM, "
                                              "llama.cpp).")
    base_url: str | list[str] | None = common("base_url", None)
    batch_size: int = option(16, "Questions per engine call; hf: also sequences per forward pass.", MODEL_ENGINE,
                             settings="stage")
    concurrency: int = common("concurrency", 8)
    compile: bool | None = common("compile", None)
    max_retries: int | None = common("max_retries", None)
    timeout: float | None = common("timeout", None)
    tokenizer: str | None = common("tokenizer", None)
    limit: int | None = option(None, "At most N questions per file, from the top.", INPUT_OUTPUT)

    def check(self) -> None:
        problems = []
        if self.engine not in ENGINES:
            problems.append(f"--engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.batch_size < 1:
            problems.append("--batch-size must be at least 1")
        if self.limit is not None and self.limit < 1:
            problems.append("--limit must be at least 1")
        if problems:
            raise UsageError("; ".join(problems))


def run(config: EvalMCConfig) -> dict:
    config.check()
    model = settings.require_model(config.model)
    if config.engine == "hf":
        model_kind.check(model, model_kind.CAUSAL_LM, "--model")
    start = time.perf_counter()
    questions = {path: read_mc(path, config.limit) for path in existing_files(config.files)}
    engine = open_engine(config, model)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results, records = {}, []
    cuts = Cuts("question(s) did not fit the model's context", "truncated_tokens")
    with meter(sum(len(rows) for rows in questions.values()), "eval mc", unit="questions") as progress:
        for path, rows in questions.items():
            predicted, credits, truncated = [], [], 0
            for row, logprobs, cut in score_questions(engine, rows, config.batch_size, progress):
                choices = row["corrects"] + row["incorrects"]
                top = max(logprobs)
                probabilities = [math.exp(lp - top) for lp in logprobs]
                probabilities = [p / sum(probabilities) for p in probabilities]
                # Correct choices come first, so taking the first best would credit every tie to the answer key.
                best = [i for i, lp in enumerate(logprobs) if tied(lp, top)]
                credit = sum(i < len(row["corrects"]) for i in best) / len(best)
                predicted.append(probabilities[best[0]])
                credits.append(credit)
                record = {"file": path, "line": row["line"], "choice": choices[best[0]], "correct": credit,
                          "p_choice": probabilities[best[0]],
                          "p_correct": sum(probabilities[: len(row["corrects"])])}
                if len(best) > 1:
                    record["tied_choices"] = len(best)
                if cuts.count(cut):
                    record[cuts.key] = cut
                    truncated += 1
                records.append(record)
            ece, bins = calibration(predicted, credits)
            results[path] = {"questions": len(rows), "accuracy": round(sum(credits) / len(credits), 4),
                             "ece": round(ece, 4), "truncated_questions": truncated, "reliability": bins}
    log_servers(engine)
    cuts.warn()
    counts = row_counts(read=sum(len(rows) for rows in questions.values()), written=len(records),
                        seconds=time.perf_counter() - start)
    return write_results(out, "eval mc", counts, {"model": model, "engine": config.engine, **engine_summary(engine)},
                         results, records)


def score_questions(engine, rows: list[dict], batch_size: int, progress):
    """(row, log-prob of each of its choices, tokens cut from its prompt) per row, in input order.

    The engine scores many texts against one choice list per call, so questions are grouped by the set of
    their choices (the HHH evaluations have two orders of " (A)", " (B)": one group), called batch_size at a
    time, and each row's log-probs are put back in its own choice order."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(tuple(sorted(set(row["corrects"] + row["incorrects"]))), []).append(index)
    scored: list = [None] * len(rows)
    for choices, indices in groups.items():
        for first in range(0, len(indices), batch_size):
            chunk = indices[first:first + batch_size]
            # The question is content: a control token written in it is read as text (caictl.data.control_text).
            scores = engine.choice_logprobs([tokens.mark(rows[i]["prompt"]) for i in chunk], list(choices))
            for i, by_choice, c in zip(chunk, scores.logprobs, scores.cuts):
                position = dict(zip(choices, by_choice))
                scored[i] = (rows[i], [position[choice] for choice in rows[i]["corrects"] + rows[i]["incorrects"]], c)
            progress.advance(len(chunk))
    return scored


def read_mc(path: str, limit: int | None = None) -> list[dict]:
    rows = []
    for row in read_rows(path):
        if limit is not None and len(rows) >= limit:
            break
        data = row.data
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) \
                or not data.get("corrects") or not data.get("incorrects"):
            raise InputError(f"{row.where}: a multiple-choice row needs 'prompt', 'corrects' and 'incorrects'")
        rows.append({"line": row.line, "prompt": data["prompt"], "corrects": list(data["corrects"]),
                     "incorrects": list(data["incorrects"])})
    if not rows:
        raise InputError(f"{path}: no questions")
    return rows
