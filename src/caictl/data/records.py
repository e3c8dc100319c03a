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
import os
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from caictl.data.conversation import ROLES, parse_transcript, prompt_from_text, up_to_last_user_turn
from caictl.errors import InputError, UsageError
from caictl.ui import log

STDIN = "-"
# Flags of a revise step that rule its revision out: revise does not build on it, sft does not train on it.
UNUSABLE_REVISION_FLAGS = frozenset({"empty_revision", "revision_copies_critique"})
# Settings that say how a model was named, kept in meta but not compared on resume: the same model may be spelled
# `models/tiny/` or `/abs/models/tiny`. Its `*_identity` (caictl.models.identity) is compared instead.
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


PROMPT_FIELDS = ("messages", "prompt", "chosen", "transcript", "init_prompt", "rl_prompt")
TRANSCRIPT_FIELDS = ("chosen", "transcript", "rl_prompt")  # rl_prompt: Anthropic's SL-CAI and RL-CAI samples


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
    elif name == "prompt" and isinstance(value, str):
        messages = prompt_from_text(value)
    elif name == "init_prompt" and isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif name in TRANSCRIPT_FIELDS and isinstance(value, str):
        messages = _transcript(value, name)
    else:
        raise ValueError(f"field {name!r} has the wrong type ({type(value).__name__})")
    messages = up_to_last_user_turn(messages)
    if not messages:
        raise ValueError(f"field {name!r} has no user message")
    if not messages[-1]["content"].strip():
        raise ValueError("the last user message is empty")
    extra = {key: value for key, value in data.items() if key not in ("id", name)}
    return Prompt(_row_id(data, messages), messages, extra)


def _check_messages(value: list, name: str) -> list[dict]:
    if not isinstance(value, list):
        raise ValueError(f"{name!r} must be a list of messages, got {type(value).__name__}")
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


def _transcript(value: Any, name: str) -> list[dict]:
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} has the wrong type ({type(value).__name__})")
    messages = parse_transcript(value)
    if not any(m["role"] == "user" for m in messages):
        raise ValueError(f"{name!r} is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript")
    return messages


def _row_id(data: dict, messages: list[dict]) -> str:
    raw_id = data.get("id")
    if raw_id is not None and not isinstance(raw_id, (str, int)):
        raise ValueError(f"'id' must be a string or an integer, got {type(raw_id).__name__}")
    return str(raw_id) if raw_id is not None else stable_id(messages)


# Where Anthropic's sampled texts stop: the model began the next human turn, or wrote its end-of-text marker.
SAMPLE_ENDS = ("\n\nHuman:", "<EOT>")


def anthropic_sample(text: str) -> str:
    """A response as Anthropic's sample files hold it, without the marker its sampling stopped on."""
    previous = None
    while previous != text:
        previous, text = text, text.strip()
        for end in SAMPLE_ENDS:
            text = text.removesuffix(end)
    return text


@dataclass
class Pairs:
    """Responses to one conversation, to be compared two by two (label's input)."""

    id: str
    messages: list[dict]
    responses: list[str]
    human_chosen_index: int | None = None  # the response a person preferred, for rows that say
    extra: dict = field(default_factory=dict)


PAIRS_FORMS = ("'messages' + 'responses' (caictl sample), 'rl_prompt' + 'sampled_answers' (Anthropic's RL-CAI "
               "samples), 'chosen' + 'rejected' (hh-rlhf transcripts, or replies to a 'prompt'), or 'text_correct' + "
               "'text_incorrect' (Anthropic's HHH evaluations)")
# The fields a pairs row is read from; the others are carried through.
PAIRS_FIELDS = ("id", "messages", "responses", "finish_reasons", "meta", "rl_prompt", "sampled_answers", "prompt",
                "chosen", "rejected", "human_chosen_index", "text_correct", "text_incorrect")
ASSISTANT_TURN = "\n\nAssistant:"


def to_pairs(data: Any) -> Pairs:
    """Normalise one row of responses to compare. Raises ValueError saying what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    extra = {key: value for key, value in data.items() if key not in PAIRS_FIELDS}
    if "messages" in data and "responses" in data:
        responses = data["responses"]
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            raise ValueError("'responses' must be a list of at least two strings")
        messages = _check_messages(data["messages"], "messages")
        return Pairs(_row_id(data, messages), messages, responses, extra=extra)
    if "rl_prompt" in data and "sampled_answers" in data:
        answers = data["sampled_answers"]
        if not isinstance(answers, list) or len(answers) < 2 \
                or not all(isinstance(a, dict) and isinstance(a.get("sampled_string"), str) for a in answers):
            raise ValueError("'sampled_answers' must be a list of at least two objects with a 'sampled_string'")
        messages = up_to_last_user_turn(_transcript(data["rl_prompt"], "rl_prompt"))
        return Pairs(_row_id(data, messages), messages, [anthropic_sample(a["sampled_string"]) for a in answers],
                     extra=extra)
    if "text_correct" in data and "text_incorrect" in data:
        return _evaluation_pairs(data, extra)
    if "chosen" in data and "rejected" in data:
        return _human_pairs(data, extra)
    raise ValueError(f"not a pairs row: expected {PAIRS_FORMS}; run `caictl sample` first")


def _human_pairs(data: dict, extra: dict) -> Pairs:
    """A comparison someone already made: the conversation up to its last human turn and the two replies."""
    prompt = data.get("prompt")
    if prompt is None:
        context = []
    elif isinstance(prompt, str):
        context = prompt_from_text(prompt)
    else:
        context = _check_messages(prompt, "prompt")
    sides = []
    for name in ("chosen", "rejected"):
        value = data[name]
        if prompt is None and isinstance(value, str):
            conversation = _transcript(value, name)  # hh-rlhf: the whole conversation in one transcript
        elif isinstance(value, str):
            conversation = context + [{"role": "assistant", "content": value}]
        else:
            conversation = context + _check_messages(value, name)
        sides.append(_last_reply(conversation, name))
    (messages, chosen), (other, rejected) = sides
    if messages != other:
        raise ValueError("'chosen' and 'rejected' differ before their last reply; expected two replies to one "
                         "conversation")
    # A caictl label record's choice was a labeller's, not a person's.
    return _chosen_and_rejected(data, messages, chosen, rejected, extra, by_a_person="p_chosen" not in data)


def _evaluation_pairs(data: dict, extra: dict) -> Pairs:
    """Anthropic's HHH evaluation row: two whole transcripts that differ in their last reply. The conversation is
    their common part up to its last "\\n\\nAssistant:"; the replies are what follows it in each. The row's `prompt`
    (the same comparison written as a multiple-choice question) is not read."""
    correct, incorrect = data["text_correct"], data["text_incorrect"]
    if not isinstance(correct, str) or not isinstance(incorrect, str):
        raise ValueError("'text_correct' and 'text_incorrect' must be transcripts (strings)")
    # The common part can run into the replies ("I can help" / "I can't"): it is cut at its last turn marker.
    cut = os.path.commonprefix([correct, incorrect]).rfind(ASSISTANT_TURN)
    messages = parse_transcript(correct[:cut]) if cut >= 0 else []
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("'text_correct' and 'text_incorrect' share no conversation ending in a human turn and "
                         "\"\\n\\nAssistant:\"")
    start = cut + len(ASSISTANT_TURN)
    return _chosen_and_rejected(data, messages, correct[start:].strip(), incorrect[start:].strip(), extra)


def _chosen_and_rejected(data: dict, messages: list[dict], chosen: str, rejected: str, extra: dict,
                         by_a_person: bool = True) -> Pairs:
    pairs_id = _row_id(data, messages)
    # The person's choice goes first or second by the row's id, so a labeller's pull towards one slot cannot
    # pass for agreement with people.
    index = int(hashlib.sha256(pairs_id.encode("utf-8")).hexdigest(), 16) % 2
    responses = [chosen, rejected] if index == 0 else [rejected, chosen]
    return Pairs(pairs_id, messages, responses, index if by_a_person else None, extra)


def _last_reply(conversation: list[dict], name: str) -> tuple[list[dict], str]:
    messages = up_to_last_user_turn(conversation)
    if not messages:
        raise ValueError(f"{name!r} has no human turn")
    reply = conversation[len(messages):]
    if not reply:
        raise ValueError(f"{name!r} has no reply after the last human turn")
    # A stray "\n\nAssistant:" inside a reply (hh-rlhf has a few) splits it into turns: it is still the one
    # reply the person read.
    return messages, "\n\nAssistant: ".join(m["content"] for m in reply).strip()


@dataclass
class Revised:
    """A revise record (sample --from-revisions and sft's input): the prompt, its first answer, its revisions."""

    id: str
    messages: list[dict]
    initial_response: str
    revisions: list[str]  # every usable round's revision, in order
    response: str | None  # the final revision; None when no round gave a usable one
    meta: dict


REVISION_FORMS = ("caictl revise output ('messages', 'initial_response', 'steps', 'response'), revise --format hf "
                  "rows ('messages', 'init_response'), or Anthropic's SL-CAI samples ('rl_prompt', 'cst')")


def to_revision(data: Any) -> Revised | None:
    """Normalise one revise record; None when the row is no revise record at all. Raises ValueError when it is
    one with a field wrong."""
    if not isinstance(data, dict):
        return None
    if "rl_prompt" in data and "cst" in data:
        return _anthropic_revision(data)
    if "messages" in data and "init_response" in data:
        return _hf_revision(data)
    if "messages" in data and "initial_response" in data and "response" in data:
        return _caictl_revision(data)
    return None


def _caictl_revision(data: dict) -> Revised:
    messages = _check_messages(data["messages"], "messages")
    initial, response, steps = data["initial_response"], data["response"], data.get("steps", [])
    if not isinstance(initial, str) or not isinstance(response, str):
        raise ValueError("'initial_response' and 'response' must be strings")
    if not isinstance(steps, list) or not all(isinstance(step, dict) for step in steps):
        raise ValueError("'steps' must be a list of objects")
    usable = [step["revision"] for step in steps
              if step.get("revision") and not UNUSABLE_REVISION_FLAGS & set(step.get("flags", []))]
    # With steps but none usable, the response is still the initial one. A record without steps counts its
    # response as the revision when it differs from the first answer.
    if not steps:
        usable = [response] if response != initial else []
    return Revised(_row_id(data, messages), messages, initial, usable, response if usable else None,
                   data.get("meta") or {})


def _hf_revision(data: dict) -> Revised:
    conversation = _check_messages(data["messages"], "messages")
    if conversation[-1]["role"] != "assistant":
        raise ValueError("'messages' must end with the final revision (an assistant turn)")
    initial, response = data["init_response"], conversation[-1]["content"]
    if not isinstance(initial, str):
        raise ValueError("'init_response' must be a string")
    # revise --format hf ends `messages` with the first answer when no round gave a usable revision.
    revisions = [response] if response != initial else []
    messages = conversation[:-1]
    return Revised(_row_id(data, messages), messages, initial, revisions, response if revisions else None,
                   data.get("meta") or {})


def _anthropic_revision(data: dict) -> Revised:
    messages = up_to_last_user_turn(_transcript(data["rl_prompt"], "rl_prompt"))
    first, rounds = data.get("initial_response"), data["cst"]
    if not isinstance(first, list) or not first or not isinstance(first[0], dict) \
            or not isinstance(first[0].get("sample"), str):
        raise ValueError("'initial_response' must be a list of objects with a 'sample'")
    if not isinstance(rounds, list):
        raise ValueError("'cst' must be a list of rounds")
    revisions = []
    for index, round_ in enumerate(rounds):
        revision = round_.get("revision") if isinstance(round_, dict) else None
        if not isinstance(revision, dict) or not isinstance(revision.get("sample"), str):
            raise ValueError(f"cst[{index}] has no 'revision': {{'sample': text}}")
        text = anthropic_sample(revision["sample"])
        if text:
            revisions.append(text)
    return Revised(_row_id(data, messages), messages, anthropic_sample(first[0]["sample"]), revisions,
                   revisions[-1] if revisions else None, {})


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


def with_upstream(meta: dict, upstream: Any) -> dict:
    """A record's meta with the meta of the row it was made from under `upstream`, so a record says what made it
    back to the first stage (a label's meta.upstream is sample's meta, whose upstream is revise's). It is no
    setting: a resume compares the top level only."""
    return {**meta, "upstream": upstream} if upstream else meta


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
