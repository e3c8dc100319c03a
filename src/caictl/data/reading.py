"""Reading input rows: JSONL, a `.json` list or stdin, streamed, with every problem reported as FILE:LINE.

Inputs are JSONL (one object a line), a `.json` list of objects, or `-` (stdin), UTF-8 with or without a BOM;
gzip is recognised by its first bytes, whatever the name. `--shard K/N` picks this job's part of an input.
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
from pathlib import Path
from typing import IO, Iterator

from caictl.data.records import Prompt, Row, to_prompt
from caictl.errors import InputError, UsageError
from caictl.ui import log

STDIN = "-"


def read_rows(path: str | Path | None, on_invalid=None) -> Iterator[Row]:
    """Yield every object in a file, line by line as it is read. A line that is not UTF-8 JSON raises
    InputError naming file:line, or goes to `on_invalid(row, reason)` when given. Gzip data that is truncated
    or corrupt does the same once the rows before it are yielded, and ends the reading there."""
    source = STDIN if path in (None, STDIN) else str(path)
    _check_path(source)
    if source.endswith(".json"):
        yield from _read_json_list(source)
        return
    # Lines are parsed here with the standard library, not jsonlines: its Reader takes any EOFError for the end of
    # input, and gzip raises EOFError on a truncated stream, so a cut file would read as a whole one.
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
        # Nothing is piped in: a read would wait, silently, for text typed at the terminal.
        if sys.stdin is not None and sys.stdin.isatty():
            command = " ".join(["caictl", *_command_words(sys.argv[1:])])
            raise UsageError(f"no input: give a file ({command} FILE.jsonl) or pipe one in (... | {command})")
        return
    if not Path(source).exists():
        raise UsageError(f"{source}: no such file")
    if Path(source).is_dir():
        raise UsageError(f"{source}: is a directory; name a .jsonl, .jsonl.gz or .json file, or - for stdin")


def _command_words(argv: list[str]) -> list[str]:
    """The command as typed ("revise", "eval compare"): the words before its first option, root options skipped."""
    words = []
    for arg in argv:
        if arg.startswith("-"):
            if words:
                break
            continue
        words.append(arg)
    return words


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
    counted = _Counted(read_rows(path, on_invalid))
    prompts = [prompt for prompt, _ in prompt_rows(counted, on_invalid)]
    if not prompts:
        source = STDIN if path in (None, STDIN) else str(path)
        rejected = getattr(on_invalid, "count", 0)
        raise InputError(f"{source}: no valid prompts in the input" if counted.count or rejected
                         else f"{source}: the input is empty")
    return prompts


def prompt_rows(rows, on_invalid=None):
    """(Prompt, Row) for each row that holds a prompt, ids made unique: a repeated conversation without an id
    (hh-rlhf has them) gets a stable suffix, a repeated explicit id is an error. For a stage that keeps each row
    as it was read beside its prompt (prompts dedupe); read_prompts is the usual way in."""
    seen: dict[str, int] = {}
    for row in rows:
        try:
            prompt = to_prompt(row.data)
        except ValueError as error:
            if on_invalid is None:
                raise InputError(f"{row.where}: {error}")
            on_invalid(row, str(error))
            continue
        seen[prompt.id] = seen.get(prompt.id, 0) + 1
        if seen[prompt.id] > 1:
            if "id" in row.data:
                message = f"duplicate id {prompt.id!r}; ids must be unique within a file"
                if on_invalid is None:
                    raise InputError(f"{row.where}: {message}")
                on_invalid(row, message)
                continue
            prompt.id = f"{prompt.id}-{seen[prompt.id]}"
        yield prompt, row


class _Counted:
    """Rows passed through, counted: an input with rows but no valid prompt is told apart from an empty one."""

    def __init__(self, rows):
        self.rows, self.count = rows, 0

    def __iter__(self):
        for row in self.rows:
            self.count += 1
            yield row


def file_hash(path: str | Path) -> str:
    """The SHA-256 of an input file, read in blocks: what a model folder's caictl.json names its data by."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Sharding -----------------------------------------------------------------------------------------------


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """--shard K/N as (K, N): part K (from 0) of N. N jobs, one per K, cover an input exactly once."""
    if text is None:
        return None
    try:
        part, parts = (int(number) for number in str(text).split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected K/N, two whole numbers (e.g. 0/4: the first of four parts)")
    if not 0 <= part < parts:
        raise UsageError(f"--shard {text!r}: K counts from 0 and must be below N (e.g. 0/{max(parts, 1)})")
    return part, parts


def shard_problem(text: str | None) -> str | None:
    """What is wrong with a --shard value, for a config's check(); None when nothing is."""
    try:
        parse_shard(text)
    except UsageError as error:
        return str(error)
    return None


def this_shard(rows: list, shard: str | None, what: str) -> list:
    """The rows of this job's part (each with an `id`), said on stderr; all of them without --shard."""
    if not shard:
        return rows
    mine = [row for row in rows if in_shard(row.id, shard)]
    log(f"shard {shard}: {len(mine)} of {len(rows)} {what}")
    return mine


def in_shard(row_id: str, shard: str | None) -> bool:
    """Whether a row belongs to this job's part. A hash of the row's id decides, not its position: the same row
    lands in the same part whatever else the input holds, and on every machine (Python's hash() is salted)."""
    part_and_parts = parse_shard(shard)
    if part_and_parts is None:
        return True
    part, parts = part_and_parts
    return int.from_bytes(hashlib.sha256(str(row_id).encode("utf-8")).digest()[:8], "big") % parts == part
