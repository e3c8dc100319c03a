"""Checkable instructions: constraints a prompt row carries, verified on a response without any judge (as IFEval does).

A prompt row may carry `"constraints": [{"type": "bullets", "count": 3}, {"type": "language", "value": "fr"}]`;
`caictl eval compare` checks every response against its prompt's constraints and reports the share met. The types:

- bullets {count}: exactly `count` lines start with a bullet marker (`-`, `*` or `•`, then a space).
- numbered {count}: exactly `count` lines start with a number and `.` or `)`, then a space (`1. `, `2) `).
- max_words {value} / min_words {value}: at most / at least `value` words, a word being a whitespace-separated
  token that holds a letter or a digit (a bullet marker is not a word).
- starts_with {value} / ends_with {value}: the response, stripped of surrounding whitespace, starts / ends with
  `value`, case-sensitive.
- contains {value} / excludes {value}: `value` occurs / does not occur as a whole word or phrase, ignoring case.
- language {value}: py3langid's most likely language for the whole response is `value`, an ISO 639-1 code.
- lowercase: no uppercase letter anywhere.
- json: the whole response is one JSON value; one ``` or ```json fence around it is allowed.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from caictl.errors import UsageError

# type -> (its field, the field's Python type); None: no field.
TYPES: dict[str, tuple[str, type] | None] = {
    "bullets": ("count", int),
    "numbered": ("count", int),
    "max_words": ("value", int),
    "min_words": ("value", int),
    "starts_with": ("value", str),
    "ends_with": ("value", str),
    "contains": ("value", str),
    "excludes": ("value", str),
    "language": ("value", str),
    "lowercase": None,
    "json": None,
}

_BULLET = re.compile(r"^\s*[-*•]\s+\S", re.M)
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+\S", re.M)
_FENCE = re.compile(r"^```[a-zA-Z]*\n(.*)\n```$", re.S)


def problems(constraints, where: str) -> list[str]:
    """Everything wrong with one row's `constraints` field, each naming `where` and the constraint's index."""
    if not isinstance(constraints, list):
        return [f"{where}: constraints: expected a list of {{type: ..., ...}}"]
    found = []
    for index, constraint in enumerate(constraints):
        at = f"{where}: constraints[{index}]"
        if not isinstance(constraint, dict) or not isinstance(constraint.get("type"), str) \
                or constraint["type"] not in TYPES:
            kind = constraint.get("type") if isinstance(constraint, dict) else constraint
            found.append(f"{at}: unknown type {kind!r}; known: {', '.join(TYPES)}")
            continue
        spec = TYPES[constraint["type"]]
        expected = {"type"} | ({spec[0]} if spec else set())
        if set(constraint) != expected:
            found.append(f"{at}: {constraint['type']} takes the field(s) {', '.join(sorted(expected))}, "
                         f"got {', '.join(sorted(constraint))}")
            continue
        if spec:
            field, kind = spec
            value = constraint[field]
            # bool is an int subclass: {"count": true} is a mistake, not 1.
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0) \
                    or (kind is str and not value.strip()):
                found.append(f"{at}: {field}: expected {'a whole number >= 0' if kind is int else 'non-empty text'}")
            elif constraint["type"] == "language" and value not in _languages():
                found.append(f"{at}: language {value!r} is not one py3langid knows; use an ISO 639-1 code such as "
                             "en, fr, de, es")
    return found


def check(response: str, constraint: dict) -> bool:
    """Whether `response` meets one (valid) constraint."""
    kind = constraint["type"]
    value = constraint.get("value", constraint.get("count"))
    if kind == "bullets":
        return len(_BULLET.findall(response)) == value
    if kind == "numbered":
        return len(_NUMBERED.findall(response)) == value
    if kind == "max_words":
        return word_count(response) <= value
    if kind == "min_words":
        return word_count(response) >= value
    if kind == "starts_with":
        return response.lstrip().startswith(value)
    if kind == "ends_with":
        return response.rstrip().endswith(value)
    if kind in ("contains", "excludes"):
        # Word boundaries only where the phrase itself starts or ends with a word character: "C++" still matches.
        pattern = (r"\b" if re.match(r"\w", value) else "") + re.escape(value) + (r"\b" if re.search(r"\w$", value)
                                                                                 else "")
        present = re.search(pattern, response, re.I) is not None
        return present if kind == "contains" else not present
    if kind == "language":
        return bool(response.strip()) and detect_language(response) == value
    if kind == "lowercase":
        return response == response.lower()
    if kind == "json":
        text = response.strip()
        fenced = _FENCE.match(text)
        try:
            json.loads(fenced.group(1) if fenced else text)
        except json.JSONDecodeError:
            return False
        return True
    raise ValueError(f"unknown constraint type {kind!r}")  # problems() refuses it before any check


def check_all(response: str, constraints: list[dict]) -> list[bool]:
    return [check(response, c) for c in constraints]


def word_count(text: str) -> int:
    # A bullet marker or a lone dash is not a word.
    return sum(1 for token in text.split() if any(ch.isalnum() for ch in token))


def detect_language(text: str) -> str:
    import py3langid

    return py3langid.classify(text)[0]


@lru_cache(maxsize=1)
def _languages() -> frozenset[str]:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return frozenset(LanguageIdentifier.from_pickled_model(MODEL_FILE).nb_classes)


def validate_rows(rows: list[tuple[str, object]]) -> None:
    """(where, constraints) per row -> one UsageError listing every problem, or nothing."""
    found = [p for where, constraints in rows for p in problems(constraints, where)]
    if found:
        raise UsageError("invalid constraints:\n  " + "\n  ".join(found[:20])
                         + (f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""))
