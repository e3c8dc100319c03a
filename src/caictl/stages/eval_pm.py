"""eval pm: how well a preference model ranks comparisons people (or a labeller) made.

    caictl eval pm hh-rlhf-test.jsonl.gz --pm models/pm -o eval/pm

Reads `text_correct`/`text_incorrect` rows, hh-rlhf chosen/rejected and preference records: accuracy, mean
margin, calibration. Writes records.jsonl, summary.json, reliability.png and report.md to the output folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from caictl.data.reading import read_rows
from caictl.errors import InputError
from caictl.evaluation.metrics import pairwise_metrics
from caictl.evaluation.results import existing_files, write_results
from caictl.models import kind as model_kind
from caictl.options import INPUT_OUTPUT, MODEL_ENGINE, option
from caictl.ui import meter, row_counts


@dataclass
class EvalPMConfig:
    files: list[str] = option(help="Comparison files: text_correct/text_incorrect, hh-rlhf, preference records.",
                              panel=INPUT_OUTPUT, argument=True)
    out: str = option(help="Output folder.", panel=INPUT_OUTPUT, short="-o")
    pm: str = option("", "A train-pm output folder.", MODEL_ENGINE, required=True)
    batch_size: int = option(32, "Texts per forward pass.", MODEL_ENGINE, settings="stage")
    max_length: int = option(512, "Tokens kept from the end of each conversation.", MODEL_ENGINE)
    names: list[str] = option(help="A name per file in the report; none: the file names.", panel=INPUT_OUTPUT,
                              default_factory=list, cli=False)


def run(config: EvalPMConfig) -> dict:
    from caictl.models.pm import Scorer, comparison_of

    model_kind.check(config.pm, model_kind.SEQ_CLS, "--pm")
    start = time.perf_counter()
    comparisons = {}
    for path in existing_files(config.files):
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
    with meter(sum(len(rows) for rows in comparisons.values()), "eval pm", unit="comparisons") as progress:
        scored = {path: score_pairs(scorer, rows, config.batch_size, progress) for path, rows in comparisons.items()}
    for path, rows in comparisons.items():
        rewards, cut = scored[path]
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
    counts = row_counts(read=sum(len(rows) for rows in comparisons.values()), written=len(records),
                        seconds=time.perf_counter() - start)
    return write_results(out, "eval pm", counts, {"pm": config.pm}, results, records)


def score_pairs(scorer, rows: list, batch_size: int, progress) -> tuple[list[float], list[int]]:
    """Rewards of chosen, rejected, chosen, ... and the tokens cut from each, batch_size comparisons a call."""
    rewards, cut = [], []
    for first in range(0, len(rows), batch_size):
        texts = [t for c in rows[first:first + batch_size] for t in (c.chosen, c.rejected)]
        rewards += scorer.score(texts)
        cut += scorer.cut_tokens(texts)
        progress.advance(len(texts) // 2)
    return rewards, cut
