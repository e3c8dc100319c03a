r"""prompts dedupe: drop exact and near-duplicate prompts, and any close to an evaluation prompt.

    caictl prompts dedupe red-team.jsonl -o red-team.dedup.jsonl \
        --against examples/held-out/harmless.jsonl --dropped dropped.jsonl

A prompt is compared by its user turns joined. Exact duplicates share their text once case, punctuation and
spacing are dropped; near duplicates reach --threshold in Jaccard similarity of their word shingles, found by
MinHash LSH (datasketch) and confirmed exactly. The first of a group is kept. With --against, a prompt that
reaches the threshold against any evaluation prompt is dropped (decontamination). The defaults (threshold 0.6,
single words) were chosen on labelled pairs: paraphrases (word order, punctuation or one word changed) against
distinct prompts; see the README. Kept rows are written as read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from caictl import __version__
from caictl.data.dedupe import DEFAULT_SHINGLE_SIZE, DEFAULT_THRESHOLD, NearIndex, normalised, prompt_text
from caictl.data.reading import prompt_rows, read_rows
from caictl.data.writing import RecordWriter, RejectWriter
from caictl.errors import UsageError
from caictl.options import INPUT_OUTPUT, METHOD, common, option
from caictl.ui import log, print_summary, row_counts


@dataclass
class PromptsDedupeConfig:
    prompts: str | None = option(None, "Input JSONL/JSON/.gz file; omit or '-' to read stdin.", INPUT_OUTPUT,
                                 argument=True)
    out: str | None = option(None, "Output JSONL; omitted: records go to stdout.", INPUT_OUTPUT, short="-o")
    against: list[str] = option(help="Evaluation prompts to keep out of the output (repeat for several files).",
                                panel=INPUT_OUTPUT, default_factory=list, repeat=True, metavar="FILE")
    dropped: str | None = option(None, "Also write every dropped row here, with the id it matched and the "
                                       "similarity, to check the threshold by eye.", INPUT_OUTPUT)
    threshold: float = option(DEFAULT_THRESHOLD, "Jaccard similarity of word shingles at which two prompts are "
                                                 "duplicates. The default lies halfway between the closest distinct "
                                                 "pair and the least similar paraphrase of 160 labelled hh-rlhf "
                                                 "pairs (README).", METHOD)
    shingle_size: int = option(DEFAULT_SHINGLE_SIZE, "Words per shingle (1: word order does not count).", METHOD)
    skip_invalid: bool = common("skip_invalid", False)

    def check(self) -> None:
        problems = []
        if not 0 < self.threshold <= 1:
            problems.append("--threshold must be in (0, 1]")
        if self.shingle_size < 1:
            problems.append("--shingle-size must be at least 1")
        if self.out not in (None, "-") and self.out == self.prompts:
            problems.append("-o must not be the input file: the output is written while the input is read")
        if problems:
            raise UsageError("; ".join(problems))


def run(config: PromptsDedupeConfig) -> dict:
    config.check()
    start = time.perf_counter()
    rejects = RejectWriter(config.out) if config.skip_invalid else None
    evaluation = NearIndex(config.threshold, config.shingle_size)
    evaluation_keys: dict[str, str] = {}
    evaluation_ids: set[str] = set()
    for path in config.against:
        _index(path, evaluation, evaluation_keys, evaluation_ids)
    rows, texts = _read(config.prompts, rejects)

    kept = NearIndex(config.threshold, config.shingle_size)
    seen_keys: dict[str, str] = {}  # normalised text -> the first row that had it
    writer = RecordWriter(config.out, {}, overwrite=True)  # a filter: each run writes its output whole
    dropped = RecordWriter(config.dropped, {}, overwrite=True) if config.dropped else None
    counts = {"exact": 0, "near": 0, "contaminated": 0}
    try:
        for (row_id, data), text, signature in zip(rows, texts, kept.signatures(texts)):
            key = normalised(text)
            # Exact first: a copy of an earlier row, kept or dropped, is the one decision made again. Then the
            # evaluation prompts, so a leaked prompt is named as such even when it is also near a kept one.
            if key in seen_keys:
                kind, match = "exact", (seen_keys[key], 1.0)
            elif key in evaluation_keys:
                kind, match = "contaminated", (evaluation_keys[key], 1.0)
            elif hit := evaluation.match(signature):
                kind, match = "contaminated", (hit.id, hit.similarity)
            elif hit := kept.match(signature):
                kind, match = "near", (hit.id, hit.similarity)
            else:
                seen_keys[key] = row_id
                kept.add(row_id, signature)
                writer.write([data])
                continue
            seen_keys.setdefault(key, row_id)
            counts[kind] += 1
            if dropped is not None:
                dropped.write([{"id": row_id, "dropped": kind, "matched_id": match[0],
                                "similarity": round(match[1], 4), "row": data}])
    finally:
        writer.close()
        if dropped is not None:
            dropped.close()

    rejected = rejects.count if rejects else 0
    written = len(rows) - sum(counts.values())
    summary = {
        "stage": "prompts dedupe",
        **row_counts(read=len(rows) + rejected, written=written, skipped=sum(counts.values()), rejected=rejected,
                     seconds=time.perf_counter() - start),
        "out": config.out or "-",
        "dropped_exact": counts["exact"],
        "dropped_near": counts["near"],
        "dropped_contaminated": counts["contaminated"],
        "evaluation_prompts": len(evaluation_ids),
        "threshold": config.threshold,
        "shingle_size": config.shingle_size,
        "caictl_version": __version__,
    }
    rows_shown = [("out", summary["out"]), ("threshold", config.threshold), ("shingle size", config.shingle_size),
                  ("dropped exact", counts["exact"]), ("dropped near", counts["near"]),
                  ("dropped contaminated", f"{counts['contaminated']} (against {len(evaluation_ids)} "
                                           f"evaluation prompts)")]
    if config.dropped:
        rows_shown.append(("dropped rows in", config.dropped))
    print_summary("prompts dedupe", summary, rows_shown)
    return summary


def _index(path: str, index: NearIndex, keys: dict[str, str], ids: set[str]) -> None:
    """Every prompt of an evaluation file into the index. Its rows must all be good: a bad one could hide the
    very prompt that leaked."""
    rows, texts = _read(path, None)
    for (row_id, _), text, signature in zip(rows, texts, index.signatures(texts)):
        if row_id in ids:  # the same id in another evaluation file: its file tells them apart
            row_id = f"{path}:{row_id}"
        ids.add(row_id)
        keys.setdefault(normalised(text), row_id)
        index.add(row_id, signature)
    log(f"--against {path}: {len(rows)} evaluation prompts")


def _read(path: str | None, rejects) -> tuple[list[tuple[str, dict]], list[str]]:
    """(id, row as read) and the text to compare, for every row. Any prompt form caictl reads is accepted."""
    rows, texts = [], []
    for prompt, row in prompt_rows(read_rows(path, on_invalid=rejects), rejects):
        rows.append((prompt.id, row.data))
        texts.append(prompt_text(prompt.messages))
    return rows, texts
