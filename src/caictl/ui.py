"""Progress bars, logs and summaries: all on stderr, so stdout stays free for records."""

from __future__ import annotations

import os
import sys
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
    """Counts rows and tokens for a progress bar that shows rows/s and tokens/s, and a note after them (a
    training stage's latest loss)."""

    def __init__(self, progress: Progress, task, unit: str):
        self.progress, self.task, self.unit = progress, task, unit
        self.start = time.perf_counter()
        self.rows = 0
        self.tokens = 0
        self.note = ""

    def advance(self, rows: int, tokens: int = 0) -> None:
        self.rows += rows
        self.tokens += tokens
        self.progress.update(self.task, advance=rows, rate=self._rate())

    def set_note(self, note: str) -> None:
        self.note = note
        self.progress.update(self.task, rate=self._rate())

    def _rate(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = f"{self.rows / elapsed:.2f} {self.unit}/s"
        if self.tokens:
            rate += f", {self.tokens / elapsed:,.0f} tok/s"
        return f"{rate}, {self.note}" if self.note else rate


@contextmanager
def meter(total: int, description: str, unit: str = "prompts", done: int = 0):
    """A progress bar on stderr; done: what an earlier run already finished (a resumed run starts there)."""
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
        task = progress.add_task(description, total=total, completed=done, rate="")
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
    """A two-column table on stderr. Figures print as figure() writes them; a tuple (before, after) as
    `before -> after`."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows:
        table.add_row(name, " -> ".join(map(figure, value)) if isinstance(value, tuple) else figure(value))
    console.print(table)


def figure(value) -> str:
    """A value as a person reads it: a float to 4 significant digits (a loss of 11.926162719726562 is 11.93; the
    JSON files keep every digit), anything else as str() writes it. A float that 4 digits already hold exactly
    (0.0, 0.25, 1e-05) prints as str() writes it too, so a table shows the same text as the summary it came from;
    from 10,000 up one is rounded to a whole number rather than written as 1.235e+04."""
    if not isinstance(value, float):
        return str(value)
    short = f"{value:.4g}"
    if float(short) == value:
        return str(value)
    return f"{value:.0f}" if abs(value) >= 1e4 else short


def quiet_transformers() -> None:
    """transformers' loading and saving bars, its load reports (weights missing or unexpected, generation config
    notes) and the datasets library's bars (TRL's dataset preparation) would interleave with caictl's own output:
    they show only under `caictl -v`, and errors always. The other processes of a several-process run keep them,
    and the warnings they share with the main process (they run the same code), to themselves."""
    from transformers.utils import logging as hf_logging

    if verbose() and is_main():
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # Importing datasets costs a second and a half that the engines, which never use it, would pay: when it is
    # not loaded yet, the variable it reads at import does the same.
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if not is_main():
        import warnings

        warnings.filterwarnings("ignore")
