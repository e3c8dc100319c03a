"""Progress bars, logs and summaries: all on stderr, so stdout stays free for records."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from caictl.models.processes import is_main

# Under torchrun / accelerate launch every process runs the same stage: only the main one speaks, or each line
# and progress bar would come once per process.
console = Console(stderr=True, quiet=not is_main())

# `caictl -v`: the resolved options in full, and the libraries' own chatter (transformers' load reports, TRL's
# progress bars), which caictl otherwise keeps out of its console.
_verbose = False


def set_verbose(on: bool) -> None:
    global _verbose
    _verbose = on


def verbose() -> bool:
    return _verbose


def log(message: str) -> None:
    console.print(message, highlight=False, soft_wrap=True)


class Meter:
    """Counts rows and tokens for a progress bar that shows rows/s and tokens/s."""

    def __init__(self, progress: Progress, task, unit: str):
        self.progress, self.task, self.unit = progress, task, unit
        self.start = time.perf_counter()
        self.rows = 0
        self.tokens = 0

    def advance(self, rows: int, tokens: int = 0) -> None:
        self.rows += rows
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = f"{self.rows / elapsed:.2f} {self.unit}/s"
        if self.tokens:
            rate += f", {self.tokens / elapsed:,.0f} tok/s"
        self.progress.update(self.task, advance=rows, rate=rate)


@contextmanager
def meter(total: int, description: str, unit: str = "prompts"):
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total, rate="")
        yield Meter(progress, task, unit)


# One vocabulary for every stage that reads rows: these six figures open its summary (the dict run() returns, and
# the summary.json where the stage writes one) and its stderr table, under the same names.
#   rows_read      input rows this run took in, after --limit, rejected rows included
#   rows_written   rows this run wrote (a training stage writes a model, not rows: 0)
#   rows_skipped   rows read but not written: already in OUT from an earlier run (resumed), or with nothing to do;
#                  the stage's own figures beside say which
#   rows_rejected  invalid rows that --skip-invalid set aside in OUT.rejects.jsonl
#   seconds        wall time of the run
#   tokens         tokens the model generated in this run (0 where a stage only scores or trains)
# A stage that writes one row per input row keeps rows_read = rows_written + rows_skipped + rows_rejected.
ROW_COUNTS = ("rows_read", "rows_written", "rows_skipped", "rows_rejected", "seconds", "tokens")


def row_counts(*, read: int, written: int, skipped: int = 0, rejected: int = 0, seconds: float,
               tokens: int = 0) -> dict:
    """The six common figures, in ROW_COUNTS order, to open a stage's summary."""
    return {"rows_read": read, "rows_written": written, "rows_skipped": skipped, "rows_rejected": rejected,
            "seconds": round(seconds, 2), "tokens": tokens}


def print_summary(title: str, summary: dict, rows: list[tuple[str, object]]) -> None:
    """A stage's summary table on stderr: the six common figures first, named as in the summary, then its own."""
    summary_table(title, [(key, summary[key]) for key in ROW_COUNTS] + rows)


def summary_table(title: str, rows: list[tuple[str, object]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)


def quiet_transformers() -> None:
    """transformers' own loading and saving bars would interleave with ours; the other processes of a
    several-process run keep the datasets library's bars (TRL's dataset preparation) and the warnings they share
    with the main process (they run the same code) to themselves."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not is_main():
        import warnings

        import datasets

        datasets.disable_progress_bars()
        hf_logging.set_verbosity_error()
        warnings.filterwarnings("ignore")
