"""Records: reading input rows, normalising prompts, and writing output that survives a killed run.

Inputs are JSONL (one object a line), a `.json` list of objects, or `-` (stdin), UTF-8 with or without a BOM;
gzip is recognised by its first bytes, whatever the name. Every problem is reported as `FILE:LINE: what is
wrong`. Outputs are appended and flushed batch by batch; running the same command again resumes: rows already
written are skipped, and a truncated last line (a run killed mid-write) is dropped.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from caictl.conversation import ROLES, parse_transcript, up_to_last_user_turn
from caictl.errors import InputError, UsageError
from caictl.ui import log

STDIN = "-"
# Flags of a revise step that rule its revision out: revise does not build on it, sft does not train on it.
UNUSABLE_REVISION_FLAGS = frozenset({"empty_revision", "revision_copies_critique"})
# Settings that say how a model was named, kept in meta but not compared on resume: the same model may be spelled
# `models/tiny/` or `/abs/models/tiny`. Its `*_identity` (caictl.model_identity) is compared instead.
NAMES_NOT_COMPARED = frozenset({"model", "judge", "pm"})


@dataclass
class Row:
    """One raw input object and where it came from."""

    source: str
    line: int  # 1-based line in a JSONL file; 1-based item number in a JSON list
    data: Any

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class Prompt:
    """A normalised prompt: a conversation that ends with a user turn."""

    id: str
    messages: list[dict]
    extra: dict = field(default_factory=dict)  # unknown input fields, carried through untouched


# Reading ------------------------------------------------------------------------------------------------


def read_rows(path: str | Path | None, on_invalid=None) -> Iterator[Row]:
    """Yield every object in a file, line by line as it is read. A line that is not UTF-8 JSON raises
    InputError naming file:line, or goes to `on_invalid(row, reason)` when given. Gzip data that is truncated
    or corrupt does the same once the rows before it are yielded, and ends the reading there."""
    source = STDIN if path in (None, STDIN) else str(path)
    _check_path(source)
    if source.endswith(".json"):
        yield from _read_json_list(source)
        return
    with _open_input(source) as stream:
        line = 0
        while True:
            try:
                raw = stream.readline()
            except GZIP_DAMAGE as error:
                _damaged_gzip(source, line, error, on_invalid)
                return
            if not raw:
                return
            line += 1
            if line == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # editors on Windows write one; it is not part of the JSON
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    continue
                data = json.loads(text)
            except UnicodeDecodeError as error:
                reason = f"not valid UTF-8 (byte {error.start}); re-encode the file as UTF-8"
            except json.JSONDecodeError as error:
                reason = f"invalid JSON ({error.msg} at column {error.colno})"
            else:
                yield Row(source, line, data)
                continue
            if on_invalid is None:
                raise InputError(f"{source}:{line}: {reason}")
            on_invalid(Row(source, line, raw.decode("utf-8", errors="replace").rstrip("\n")), reason)


GZIP_MAGIC = b"\x1f\x8b"
# What gzip raises mid-stream: EOFError when the data ends early, zlib.error on a damaged block, BadGzipFile on a
# bad checksum or header.
GZIP_DAMAGE = (EOFError, zlib.error, gzip.BadGzipFile)


def _check_path(source: str) -> None:
    if source == STDIN:
        return
    if not Path(source).exists():
        raise UsageError(f"{source}: no such file")
    if Path(source).is_dir():
        raise UsageError(f"{source}: is a directory; name a .jsonl, .jsonl.gz or .json file, or - for stdin")


@contextmanager
def _open_input(source: str) -> Iterator[IO[bytes]]:
    """The input's bytes, decompressed when they start with gzip's magic number, whatever the file is called."""
    if source == STDIN:
        # Not ours to close. A stdin swapped for a BytesIO (a test runner, a Python caller) cannot peek.
        handle = sys.stdin.buffer
        yield _gunzip_if_gzip(handle if hasattr(handle, "peek") else io.BufferedReader(handle))
        return
    try:
        handle = open(source, "rb")
    except OSError as error:
        raise UsageError(f"{source}: cannot be read ({error.strerror}); check its permissions")
    with handle:
        yield _gunzip_if_gzip(handle)


def _gunzip_if_gzip(handle: io.BufferedReader) -> IO[bytes]:
    # Peek, not read and seek back: stdin and `<(zcat ...)` are pipes, which cannot seek.
    if handle.peek(2)[:2] == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=handle, mode="rb")
    return handle


def _damaged_gzip(source: str, lines_read: int, error: Exception, on_invalid) -> None:
    where = f"{source}:{lines_read + 1}"
    if on_invalid is None:
        raise InputError(f"{where}: truncated or corrupt gzip data ({error}); re-create or re-download the file "
                         f"(--skip-invalid, in the stages that have it, keeps the {lines_read} line(s) before it)")
    reason = (f"truncated or corrupt gzip data ({error}); the {lines_read} line(s) before it were read, "
              "the rest of the file is lost")
    # One reject entry stands for an unknown number of lost rows, so say it where it will be seen.
    log(f"warning: {where}: {reason}")
    on_invalid(Row(source, lines_read + 1, None), reason)


def _read_json_list(source: str) -> Iterator[Row]:
    # A JSON list is parsed whole: there is no row to yield before its closing bracket.
    try:
        with _open_input(source) as stream:
            content = stream.read()
    except GZIP_DAMAGE as error:
        raise InputError(f"{source}: truncated or corrupt gzip data ({error}); re-create or re-download the file")
    try:
        data = json.loads(content.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise InputError(f"{source}: not valid UTF-8 (byte {error.start}); re-encode the file as UTF-8")
    except json.JSONDecodeError as error:
        raise InputError(f"{source}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})")
    if not isinstance(data, list):
        raise InputError(f"{source}: a .json input must hold a list of objects; use .jsonl for one object a line")
    for index, item in enumerate(data, start=1):
        yield Row(source, index, item)


def read_prompts(path: str | Path | None, on_invalid=None) -> list[Prompt]:
    """Read and normalise every prompt. `on_invalid(row, reason)` skips bad rows; without it they raise."""
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    source = STDIN if path in (None, STDIN) else str(path)
    rows = 0
    for row in read_rows(path, on_invalid):
        rows += 1
        try:
            prompt = to_prompt(row.data)
        except ValueError as error:
            if on_invalid is None:
                raise InputError(f"{row.where}: {error}")
            on_invalid(row, str(error))
            continue
        # Repeated conversations (hh-rlhf has them) get distinct, still stable, ids.
        seen[prompt.id] = seen.get(prompt.id, 0) + 1
        if seen[prompt.id] > 1:
            if "id" in row.data:
                message = f"duplicate id {prompt.id!r}; ids must be unique within a file"
                if on_invalid is None:
                    raise InputError(f"{row.where}: {message}")
                on_invalid(row, message)
                continue
            prompt.id = f"{prompt.id}-{seen[prompt.id]}"
        prompts.append(prompt)
    if not prompts:
        rejected = getattr(on_invalid, "count", 0)
        raise InputError(f"{source}: no valid prompts in the input" if rows or rejected
                         else f"{source}: the input is empty")
    return prompts


PROMPT_FIELDS = ("messages", "prompt", "chosen", "transcript", "init_prompt")


def to_prompt(data: Any) -> Prompt:
    """Normalise one input object to a Prompt. Raises ValueError saying what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    present = [name for name in PROMPT_FIELDS if name in data]
    if not present:
        raise ValueError(f"no prompt field; expected one of: {', '.join(PROMPT_FIELDS)}")
    name = present[0]
    value = data[name]
    if name in ("messages", "prompt") and isinstance(value, list):
        messages = _check_messages(value, name)
    elif name in ("prompt", "init_prompt") and isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif name in ("chosen", "transcript") and isinstance(value, str):
        messages = parse_transcript(value)
        if not any(m["role"] == "user" for m in messages):
            raise ValueError(f"{name!r} is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript")
    else:
        raise ValueError(f"field {name!r} has the wrong type ({type(value).__name__})")
    messages = up_to_last_user_turn(messages)
    if not messages:
        raise ValueError(f"field {name!r} has no user message")
    if not messages[-1]["content"].strip():
        raise ValueError("the last user message is empty")
    raw_id = data.get("id")
    if raw_id is not None and not isinstance(raw_id, (str, int)):
        raise ValueError(f"'id' must be a string or an integer, got {type(raw_id).__name__}")
    prompt_id = str(raw_id) if raw_id is not None else stable_id(messages)
    extra = {key: value for key, value in data.items() if key not in ("id", name)}
    return Prompt(prompt_id, messages, extra)


def _check_messages(value: list, name: str) -> list[dict]:
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{name}[{index}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise ValueError(f"{name}[{index}] has role {message['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise ValueError(f"{name}[{index}].content must be a string")
        messages.append({"role": message["role"], "content": message["content"]})
    if not messages:
        raise ValueError(f"{name!r} is an empty list")
    return messages


def stable_id(messages: list[dict]) -> str:
    """A short hash of the conversation: the same prompt gets the same id in every run."""
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False)
    return "p-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Writing ------------------------------------------------------------------------------------------------


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
                self._check_settings(record, line)
            self.done.add(str(record.get("id")))

    def _check_settings(self, record: dict, line: int) -> None:
        meta = record.get("meta") or {}
        differ = [key for key, value in self.settings.items()
                  if key not in NAMES_NOT_COMPARED and meta.get(key) != value]
        if differ:
            detail = ", ".join(f"{key}: {meta.get(key)!r} there, {self.settings[key]!r} now" for key in differ)
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
