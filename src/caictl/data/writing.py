"""Writing output that survives a killed run: records appended and flushed batch by batch, and resumed.

Running the same command again resumes: rows already written are skipped, a truncated last line (a run killed
mid-write) is dropped, and a run whose settings differ from what the file holds refuses to append.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from caictl.data.reading import STDIN
from caictl.data.records import Row
from caictl.errors import InputError, UsageError

# Settings that say how a model was named, kept in meta but not compared on resume: the same model may be spelled
# `models/tiny/` or `/abs/models/tiny`. Its `*_identity` (caictl.models.identity) is compared instead.
NAMES_NOT_COMPARED = frozenset({"model", "judge", "pm", "prompt_form_fallback"})


def batches(items: list, size: int) -> list[list]:
    """Consecutive slices of `size` items: what a stage processes and writes at a time, so that a killed run
    loses at most one batch of work."""
    return [items[first:first + size] for first in range(0, len(items), size)]


class RecordWriter:
    """Appends records to OUT (or stdout) and resumes an earlier run of the same command.

    `settings` are the meta fields that must match for a resume: a run whose model, constitution or
    rounds differ from what OUT already holds refuses to append.
    """

    def __init__(self, out: str | Path | None, settings: dict, overwrite: bool = False):
        self.path = None if out in (None, STDIN) else Path(out)
        self.settings = settings
        self.done: set[str] = set()
        self.dropped_partial_line = False
        self._first: tuple[dict, int] | None = None  # the first record already in OUT, and its line
        if self.path is None:
            self._handle = sys.stdout
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and not overwrite:
            self._load_existing()
        elif self.path.exists():
            self.path.unlink()
        self._handle = open(self.path, "a", encoding="utf-8")

    def _load_existing(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # A run killed mid-write leaves a partial last line: drop it, that row is redone.
            with open(self.path, "r+b") as handle:
                handle.truncate(end)
            self.dropped_partial_line = True
        for line, raw in enumerate(data[:end].splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as error:
                raise InputError(
                    f"{self.path}:{line}: existing output is not valid JSON ({error.msg}); "
                    "fix or remove the line, or pass --overwrite to start again"
                )
            if not self.done:
                self._first = (record, line)
                self._check_settings(record, line)
            self.done.add(str(record.get("id")))

    def settle(self, settings: dict) -> None:
        """Settings known only once the engine is open (how its prompts reach the model): checked against what
        OUT already holds, as those given at the start are, then written into every later row's meta (the
        settings dict is the one the stage builds its rows' meta from)."""
        if self._first is not None:
            self._check_settings(*self._first, settings)
        self.settings.update(settings)

    def _check_settings(self, record: dict, line: int, settings: dict | None = None) -> None:
        meta = record.get("meta") or {}
        settings = self.settings if settings is None else settings
        differ = [key for key, value in settings.items()
                  if key not in NAMES_NOT_COMPARED and meta.get(key) != value]
        if differ:
            detail = ", ".join(f"{key}: {meta.get(key)!r} there, {settings[key]!r} now" for key in differ)
            raise UsageError(
                f"{self.path}:{line}: was written with other settings ({detail}); "
                "pass --overwrite to start again, or -o a new file"
            )

    def write(self, records: list[dict]) -> None:
        for record in records:
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            if "id" in record:
                self.done.add(str(record["id"]))
        self._handle.flush()

    def close(self) -> None:
        if self.path is not None:
            self._handle.close()


class RejectWriter:
    """Rows that --skip-invalid set aside, each with the reason, in OUT.rejects.jsonl."""

    def __init__(self, out: str | Path | None):
        self.path = Path(f"{out}.rejects.jsonl" if out not in (None, STDIN) else "caictl.rejects.jsonl")
        self.count = 0

    def __call__(self, row: Row, reason: str) -> None:
        entry = {"source": row.source, "line": row.line, "error": reason, "row": row.data}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.count += 1


def with_upstream(meta: dict, upstream: Any) -> dict:
    """A record's meta with the meta of the row it was made from under `upstream`, so a record says what made it
    back to the first stage (a label's meta.upstream is sample's meta, whose upstream is revise's). It is no
    setting: a resume compares the top level only."""
    return {**meta, "upstream": upstream} if upstream else meta
