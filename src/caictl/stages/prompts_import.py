r"""prompts import: prompts from the files people have, as caictl prompt rows (id, messages, meta.source).

    caictl prompts import questions.txt red_team_attempts.jsonl \
        -o prompts.jsonl
    caictl prompts import survey.csv --column question -o prompts.jsonl

Plain text (a prompt a line), CSV/TSV (--column), JSONL or a JSON array (each row in any form caictl reads, or
--field a.b), Hugging Face dataset folders and parquet files. hh-rlhf transcripts keep their turns up to the
last human one; Anthropic's red-team attempts keep rating, task_description and
min_harmlessness_score_transcript in meta. A row's own id is kept; otherwise the id is a hash of the prompt, so a
re-run gives the same ids and resumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from caictl import __version__
from caictl.data.prompt_sources import FORMATS, source_format, source_rows, to_messages
from caictl.data.records import stable_id
from caictl.data.writing import RecordWriter, RejectWriter
from caictl.errors import InputError, UsageError
from caictl.options import INPUT_OUTPUT, RUNS, common, option
from caictl.ui import log, print_summary, row_counts


@dataclass
class PromptsImportConfig:
    sources: list[str] = option(help="Files (.txt, .csv, .tsv, .jsonl, .json, .parquet, .gz of those) or "
                                     "dataset folders.", panel=INPUT_OUTPUT, argument=True)
    out: str | None = option(None, "Output JSONL; omitted: records go to stdout.", INPUT_OUTPUT, short="-o")
    format: str = option("auto", "text, csv, tsv, json, hf or parquet for every source; auto: a folder is a "
                                 "dataset, a file goes by its suffix.", INPUT_OUTPUT)
    column: str | None = option(None, "CSV/TSV: the column holding the prompt (a table of one column needs "
                                      "none).", INPUT_OUTPUT)
    field: str | None = option(None, "JSON, dataset and parquet rows: the field holding the prompt, a dotted "
                                     "path (conversation.0.text); unset: any form caictl reads.", INPUT_OUTPUT)
    skip_invalid: bool = common("skip_invalid", False)
    overwrite: bool = option(False, "Start OUT afresh instead of resuming it.", RUNS)

    def check(self) -> None:
        problems = []
        if not self.sources:
            problems.append("name at least one source file")
        if self.format not in FORMATS:
            problems.append(f"--format {self.format!r}: choose one of {', '.join(FORMATS)}")
        if problems:
            raise UsageError("; ".join(problems))


def run(config: PromptsImportConfig) -> dict:
    config.check()
    start = time.perf_counter()
    formats = {path: source_format(path, config.format) for path in config.sources}  # all named before any read
    rejects = RejectWriter(config.out) if config.skip_invalid else None
    writer = RecordWriter(config.out, {"stage": "prompts import"}, overwrite=config.overwrite)
    resumed = bool(writer.done)
    read, written, per_source = 0, 0, {}
    named: dict[str, str] = {}  # id -> where it was first used
    try:
        for path, fmt in formats.items():
            field = config.column if fmt in ("csv", "tsv") else config.field
            records = []
            for row in source_rows(path, fmt, config.column):
                read += 1
                try:
                    record = _record(row, fmt, field, named)
                except ValueError as error:
                    if rejects is None:
                        raise InputError(f"{row.where}: {error}")
                    rejects(row, str(error))
                    continue
                if record["id"] not in writer.done:
                    records.append(record)
            writer.write(records)
            written += len(records)
            per_source[path] = len(records)
            log(f"{path} ({fmt}): {len(records)} prompts")
    finally:
        writer.close()
    rejected = rejects.count if rejects else 0
    if read - rejected == 0:
        raise InputError(f"{', '.join(config.sources)}: no prompts in the input"
                         + (f" (all {rejected} rows rejected; see {rejects.path})" if rejected else ""))
    summary = {
        "stage": "prompts import",
        **row_counts(read=read, written=written, skipped=read - rejected - written, rejected=rejected,
                     seconds=time.perf_counter() - start),
        "out": config.out or "-",
        "prompts_per_source": per_source,
        "resumed": resumed,
        "caictl_version": __version__,
    }
    rows = [("out", summary["out"])] + [(f"from {path}", count) for path, count in per_source.items()]
    if rejected:
        rows.append(("rejected rows in", rejects.path))
    print_summary("prompts import", summary, rows)
    return summary


def _record(row, fmt: str, field: str | None, named: dict[str, str]) -> dict:
    """One prompt row. A repeated prompt without an id of its own gets the next suffix (its id stays stable:
    the same file read again repeats in the same order); a repeated id the source gave is an error."""
    messages, kept, own_id = to_messages(row.data, field)
    record_id = own_id or stable_id(messages)
    if record_id in named:
        if own_id is not None:
            raise ValueError(f"id {own_id!r} is already used at {named[record_id]}; ids must be unique across "
                             "the sources")
        number = 2
        while f"{record_id}-{number}" in named:
            number += 1
        record_id = f"{record_id}-{number}"
    named[record_id] = row.where
    meta = {"stage": "prompts import", "source": row.source, "line": row.line, "format": fmt, **kept}
    return {"id": record_id, "messages": messages, "meta": meta}
