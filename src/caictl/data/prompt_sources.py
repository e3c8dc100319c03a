"""Prompt sources people already have, read as rows for `caictl prompts import`.

Plain text (one prompt a line), CSV and TSV (a column), JSONL or a JSON array (rows, or a field at a dotted path),
Hugging Face dataset folders (`datasets.load_from_disk`) and parquet files. A row without a named field is read in
every form caictl knows (caictl.data.records.to_prompt: messages, prompt, hh-rlhf transcripts, ...) and in the
form of Anthropic's red-team attempts (`transcript`, `rating`, `task_description`,
`min_harmlessness_score_transcript`, published as one JSON array), whose scores are kept. A transcript keeps its
turns up to the last human one. Each source row has a `line` (1-based line, list item or dataset row) so every
problem names FILE:LINE.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Iterator

from caictl.data.conversation import prompt_from_text, up_to_last_user_turn
from caictl.data.reading import GZIP_MAGIC, read_rows
from caictl.data.records import Row, to_prompt
from caictl.errors import InputError, UsageError

FORMATS = ("auto", "text", "csv", "tsv", "json", "hf", "parquet")
_SUFFIXES = {".txt": "text", ".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# The fields of a red-team attempt kept in meta; its `transcript` becomes the messages.
RED_TEAM_FIELDS = ("rating", "task_description", "min_harmlessness_score_transcript")
# As caictl.data.conversation.prompt_from_text reads them: only a leading human turn makes a transcript.
TRANSCRIPT_STARTS = ("\n\nHuman:", "Human:")


def source_format(path: str, requested: str) -> str:
    """The format of one source: as asked, else a folder is a Hugging Face dataset, else by its suffix
    (.gz aside)."""
    if requested != "auto":
        return requested
    if Path(path).is_dir():
        return "hf"
    suffix = Path(path.removesuffix(".gz")).suffix.lower()
    if suffix not in _SUFFIXES:
        raise UsageError(f"{path}: cannot tell its format from the name; pass --format "
                         f"({', '.join(FORMATS[1:])})")
    return _SUFFIXES[suffix]


def source_rows(path: str, fmt: str, column: str | None) -> Iterator[Row]:
    """The rows of one source: a line of text, or an object (a CSV/TSV row is one, read by its --column)."""
    if fmt != "hf" and not Path(path).is_file():
        raise UsageError(f"{path}: no such file" if not Path(path).exists() else f"{path}: is not a file")
    if fmt == "text":
        yield from _text_rows(path)
    elif fmt in ("csv", "tsv"):
        yield from _table_rows(path, "," if fmt == "csv" else "\t", column)
    elif fmt == "json":
        yield from _json_rows(path)
    elif fmt == "hf":
        yield from _dataset_rows(path)
    elif fmt == "parquet":
        yield from _parquet_rows(path)
    else:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def to_messages(data, field: str | None) -> tuple[list[dict], dict, str | None]:
    """(messages, meta to keep, the row's own id or None) for one row; `field` is --field, or a table's
    --column. Raises ValueError saying what is wrong."""
    if isinstance(data, str):
        return _from_value(data, "line"), {}, None
    if not isinstance(data, dict):
        raise ValueError(f"expected an object, got {type(data).__name__}")
    own_id = data.get("id")
    if own_id is not None and not isinstance(own_id, (str, int)):
        raise ValueError(f"'id' must be a string or an integer, got {type(own_id).__name__}")
    own_id = None if own_id in (None, "") else str(own_id)
    if field is not None:
        return _from_value(_dotted(data, field), field), {}, own_id
    if isinstance(data.get("transcript"), str) and any(name in data for name in RED_TEAM_FIELDS):
        messages = _from_value(data["transcript"], "transcript")
        return messages, {name: data[name] for name in RED_TEAM_FIELDS if name in data}, own_id
    return to_prompt(data).messages, {}, own_id


def _from_value(value, name: str) -> list[dict]:
    if isinstance(value, list):
        return to_prompt({"messages": value}).messages
    if not isinstance(value, str):
        raise ValueError(f"{name!r} is a {type(value).__name__}; expected text or a list of messages")
    if value.lstrip(" ").startswith(TRANSCRIPT_STARTS):
        messages = up_to_last_user_turn(prompt_from_text(value.lstrip(" ")))
        if not messages:
            raise ValueError(f"{name!r} is a transcript with no human turn")
    else:
        messages = [{"role": "user", "content": value.strip()}]
    if not messages[-1]["content"].strip():
        raise ValueError(f"{name!r} is empty" if len(messages) == 1 else "the last human turn is empty")
    return messages


def _dotted(data: dict, path: str):
    """data["a"]["b"] for "a.b"; a list step is a number ("turns.0.text")."""
    if path in data:  # a CSV column or a key that has dots of its own
        return data[path]
    value = data
    for step in path.split("."):
        if isinstance(value, dict) and step in value:
            value = value[step]
        elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        else:
            raise ValueError(f"no field {path!r} (stopped at {step!r}); fields here: "
                             f"{', '.join(map(str, data)) or 'none'}")
    return value


def _open_text(path: str) -> io.TextIOBase:
    """A source as text: UTF-8 with or without a BOM, gzip recognised by its first bytes."""
    handle = open(path, "rb")
    if handle.peek(2)[:2] == GZIP_MAGIC:
        handle = gzip.GzipFile(fileobj=handle, mode="rb")
    return io.TextIOWrapper(handle, encoding="utf-8-sig", newline="")


def _text_rows(path: str) -> Iterator[Row]:
    try:
        with _open_text(path) as stream:
            for line, text in enumerate(stream, start=1):
                if text.strip():
                    yield Row(path, line, text.rstrip("\r\n"))
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not valid UTF-8 (byte {error.start}); re-encode the file as UTF-8")


def _table_rows(path: str, delimiter: str, column: str | None) -> Iterator[Row]:
    with _open_text(path) as stream:
        reader = csv.DictReader(stream, delimiter=delimiter)
        names = reader.fieldnames or []
        if column is None and len(names) != 1:
            raise UsageError(f"{path}: pass --column, one of: {', '.join(names) or '(no header row)'}")
        if column is not None and column not in names:
            raise UsageError(f"{path}: no column {column!r}; columns: {', '.join(names)}")
        for record in reader:
            # reader.line_num is the line the record ended on: a quoted value may span lines. A table of one
            # column is a list of texts.
            yield Row(path, reader.line_num, record if column else record[names[0]] or "")


def _json_rows(path: str) -> Iterator[Row]:
    """JSONL, or one JSON array whatever the name (Anthropic's red-team file is an array called .jsonl)."""
    with _open_text(path) as stream:
        start = stream.read(64).lstrip()
    if not start.startswith("["):
        yield from read_rows(path)
        return
    try:
        with _open_text(path) as stream:
            data = json.load(stream)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})")
    for index, item in enumerate(data, start=1):
        yield Row(path, index, item)


def _dataset_rows(path: str) -> Iterator[Row]:
    """Every row of a `save_to_disk` folder; a DatasetDict's splits one after another, named in the source."""
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(path)
    except FileNotFoundError as error:
        raise UsageError(f"{path}: not a Hugging Face dataset folder ({error}); save one with "
                         "Dataset.save_to_disk, or name a file")
    splits = loaded.items() if isinstance(loaded, DatasetDict) else [(None, loaded)]
    for split, dataset in splits:
        source = f"{path}[{split}]" if split else path
        for index, item in enumerate(dataset, start=1):
            yield Row(source, index, item)


def _parquet_rows(path: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for item in batch.to_pylist():
            index += 1
            yield Row(path, index, item)
