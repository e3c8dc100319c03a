"""Constitutions: the principles that drive critiques, revisions and preference labels.

    caictl constitution show harmless
    caictl constitution convert CritiqueRevisionInstructions.json RLMadisonInstructions.json -o mine.yaml

Our own format is YAML (see constitutions/harmless.yaml), or the same fields as JSON. The loader also reads
what people already have: Anthropic's prompt files published with the paper (critique/revision requests keyed
`harmful0..`, the list of comparison principles, the few-shot files) and Hugging Face's llm-swarm JSON
(`constitutions`, `system_chat`). Several files merge into one constitution, since Anthropic's is spread over
several; a file may hold examples alone, and a stage refuses only a merged constitution lacking the principles
it needs.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from caictl.data.conversation import parse_transcript
from caictl.errors import CaictlError, UsageError

SHIPPED = Path(__file__).parents[1] / "constitutions"
DEFAULT = "harmless"
YAML_SUFFIXES = (".yaml", ".yml")  # read and written as YAML; any other file is read as JSON


@dataclass
class PrincipleExample:
    """A worked critique and revision under one principle; `messages` ends with the response critiqued."""

    messages: list[dict]
    critique: str
    revision: str


@dataclass
class CritiquePrinciple:
    id: str
    critique_request: str
    revision_request: str
    examples: list[PrincipleExample] = field(default_factory=list)


@dataclass
class ComparisonPrinciple:
    id: str
    text: str  # the question put to the feedback model, followed by options (A) and (B)


@dataclass
class FewShot:
    """A whole critique -> revision exchange, shown before the real one to keep the model in its role."""

    messages: list[dict]
    critique_request: str
    critique: str
    revision_request: str
    revision: str


@dataclass
class LabelExample:
    """A worked preference label: which of two responses is better under a principle, and why."""

    messages: list[dict]
    response_a: str
    response_b: str
    answer: str  # "A" or "B"
    principle: str = ""
    reasoning: str = ""


@dataclass
class Constitution:
    name: str
    critique_revision: list[CritiquePrinciple] = field(default_factory=list)
    comparison: list[ComparisonPrinciple] = field(default_factory=list)
    few_shot: list[FewShot] = field(default_factory=list)
    label_few_shot: list[LabelExample] = field(default_factory=list)
    version: int = 1
    description: str = ""

    def content_hash(self) -> str:
        """Changes whenever any principle or example changes; recorded in every record's meta."""
        canonical = json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def restrict(self, ids: list[str]) -> Constitution:
        """Keep only the principles with these ids (of either kind); unknown ids are an error."""
        known = {p.id for p in self.critique_revision} | {p.id for p in self.comparison}
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise UsageError(
                f"unknown principle id(s) {', '.join(unknown)} in constitution {self.name!r}; "
                f"see `caictl constitution show {self.name}` for the ids"
            )
        keep = set(ids)
        return Constitution(
            name=self.name,
            critique_revision=[p for p in self.critique_revision if p.id in keep] or self.critique_revision,
            comparison=[p for p in self.comparison if p.id in keep] or self.comparison,
            few_shot=self.few_shot,
            label_few_shot=self.label_few_shot,
            version=self.version,
            description=self.description,
        )

    def draw_critique_principles(self, rounds: int, rng: random.Random) -> list[CritiquePrinciple]:
        """A principle per round: without repeats while there are enough principles, as the rounds are
        meant to look at the response from different angles."""
        principles = self.critique_revision
        if rounds <= len(principles):
            return rng.sample(principles, rounds)
        return [rng.choice(principles) for _ in range(rounds)]


# Loading ------------------------------------------------------------------------------------------------


def load(specs: str | Path | list[str | Path]) -> Constitution:
    """Load one constitution from a shipped name, a path, or several paths (merged in order)."""
    if isinstance(specs, (str, Path)):
        specs = [part for part in str(specs).split(",") if part]
    parts = [_load_one(spec) for spec in specs]
    if not parts:
        raise UsageError("no constitution given")
    merged = parts[0]
    for part in parts[1:]:
        merged.critique_revision += part.critique_revision
        merged.comparison += part.comparison
        merged.few_shot += part.few_shot
        merged.label_few_shot += part.label_few_shot
    ids = [p.id for p in merged.critique_revision] + [p.id for p in merged.comparison]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise UsageError(f"constitution {_spec_text(specs)}: duplicate principle ids: {', '.join(duplicates)}; "
                         "rename them in one file, or merge fewer files")
    return merged


def load_for_stage(spec, principle_ids: list[str], section: str) -> Constitution:
    """Load, keep only `principle_ids` (when given), and check there are principles in `section`
    ("critique_revision" for revise, "comparison" for label)."""
    constitution = load(spec)
    if principle_ids:
        constitution = constitution.restrict(principle_ids)
    if not getattr(constitution, section):
        # A file of examples alone (Anthropic's few-shot files) is valid, but only merged with principles.
        kind = "critique/revision" if section == "critique_revision" else "comparison"
        given = _spec_text(spec)
        raise UsageError(f"constitution {given} has no {kind} principles; merge in a file that has them: "
                         f"--constitution {given},PRINCIPLES_FILE")
    return constitution


def validate(specs: list[str]) -> None:
    """Check every spec, not stopping at the first bad one: `SPEC: ok (...)` on stdout, each error on stderr,
    then one error naming the failed specs. A comma-separated spec is checked merged."""
    failed = []
    for spec in specs:
        try:
            loaded = load(spec)
        except CaictlError as error:
            failed.append(spec)
            sys.stderr.write(f"{error}\n")
            continue
        line = (f"{spec}: ok ({len(loaded.critique_revision)} critique/revision principles, "
                f"{len(loaded.comparison)} comparison principles, {len(loaded.few_shot)} few-shot, "
                f"{len(loaded.label_few_shot)} labelling examples, hash {loaded.content_hash()})")
        if not loaded.critique_revision and not loaded.comparison:
            line += f"; examples only: use it merged, --constitution {spec},PRINCIPLES_FILE"
        print(line)
    if failed:
        raise UsageError(f"{len(failed)} of {len(specs)} constitutions failed validation: {', '.join(failed)}")


def _spec_text(spec) -> str:
    return str(spec) if isinstance(spec, (str, Path)) else ",".join(map(str, spec))


def shipped_names() -> list[str]:
    return sorted(path.stem for path in SHIPPED.glob("*.yaml"))


def _load_one(spec: str | Path) -> Constitution:
    path = Path(spec)
    if not path.exists():
        if str(spec) in shipped_names():
            path = SHIPPED / f"{spec}.yaml"
        else:
            raise UsageError(
                f"{spec}: no such constitution file; shipped constitutions: {', '.join(shipped_names())}"
            )
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in YAML_SUFFIXES:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise UsageError(f"{where}: invalid YAML ({getattr(error, 'problem', error)})")
        return from_yaml_data(data, str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}:{error.lineno}: invalid JSON ({error.msg})")
    return from_external(data, path)


_FIELDS = {
    "top": {"name", "version", "description", "critique_revision", "comparison", "few_shot", "label_few_shot"},
    "critique_revision": {"id", "critique_request", "revision_request", "examples"},
    "examples": {"messages", "critique", "revision"},
    "comparison": {"id", "text"},
    "few_shot": {"messages", "critique_request", "critique", "revision_request", "revision"},
    "label_few_shot": {"messages", "response_a", "response_b", "answer", "principle", "reasoning"},
}
_OPTIONAL = {"version", "description", "examples", "principle", "reasoning", "critique_revision", "comparison",
             "few_shot", "label_few_shot"}


def from_yaml_data(data, source: str) -> Constitution:
    """Validate our YAML format strictly, reporting every problem at once."""
    problems: list[str] = []

    def check(obj, kind: str, where: str) -> dict:
        if not isinstance(obj, dict):
            problems.append(f"{where}: expected a mapping")
            return {}
        unknown = set(obj) - _FIELDS[kind]
        missing = _FIELDS[kind] - _OPTIONAL - set(obj)
        if unknown:
            problems.append(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        if missing:
            problems.append(f"{where}: missing field(s) {', '.join(sorted(missing))}")
        for key, value in obj.items():
            if key in ("messages", "examples") or kind == "top":
                continue
            if not isinstance(value, str) or not value.strip():
                problems.append(f"{where}.{key}: expected non-empty text")
        if "messages" in obj:
            _check_example_messages(obj["messages"], f"{where}.messages", problems)
        return obj

    def items(obj, key: str) -> list:
        value = obj.get(key) or []
        if not isinstance(value, list):
            problems.append(f"{source}: {key}: expected a list")
            return []
        return value

    top = check(data, "top", source)
    if not str(top.get("name", "")).strip():
        problems.append(f"{source}: name: expected non-empty text")
    sl = []
    for i, raw in enumerate(items(top, "critique_revision")):
        p = check(raw, "critique_revision", f"{source}: critique_revision[{i}]")
        examples = []
        for j, ex in enumerate(p.get("examples") or []):
            e = check(ex, "examples", f"{source}: critique_revision[{i}].examples[{j}]")
            examples.append(PrincipleExample(e.get("messages", []), e.get("critique", ""), e.get("revision", "")))
        sl.append(CritiquePrinciple(str(p.get("id", "")), p.get("critique_request", ""),
                                    p.get("revision_request", ""), examples))
    rl = []
    for i, raw in enumerate(items(top, "comparison")):
        p = check(raw, "comparison", f"{source}: comparison[{i}]")
        rl.append(ComparisonPrinciple(str(p.get("id", "")), p.get("text", "")))
    shots = []
    for i, raw in enumerate(items(top, "few_shot")):
        s = check(raw, "few_shot", f"{source}: few_shot[{i}]")
        shots.append(FewShot(s.get("messages", []), s.get("critique_request", ""), s.get("critique", ""),
                             s.get("revision_request", ""), s.get("revision", "")))
    labels = []
    for i, raw in enumerate(items(top, "label_few_shot")):
        s = check(raw, "label_few_shot", f"{source}: label_few_shot[{i}]")
        if s.get("answer") not in (None, "A", "B"):
            problems.append(f"{source}: label_few_shot[{i}].answer: expected A or B")
        labels.append(LabelExample(s.get("messages", []), s.get("response_a", ""), s.get("response_b", ""),
                                   s.get("answer", "A"), s.get("principle", ""), s.get("reasoning", "")))
    if not (sl or rl or shots or labels):
        problems.append(f"{source}: nothing in it: give critique_revision, comparison, few_shot or "
                        "label_few_shot entries")
    if problems:
        raise UsageError("invalid constitution:\n  " + "\n  ".join(problems))
    return Constitution(str(top["name"]), sl, rl, shots, labels, int(top.get("version", 1)),
                        str(top.get("description", "")).strip())


def _check_example_messages(messages, where: str, problems: list[str]) -> None:
    if not isinstance(messages, list) or not messages:
        problems.append(f"{where}: expected a non-empty list of messages")
        return
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant") \
                or not isinstance(message.get("content"), str):
            problems.append(f"{where}[{k}]: expected {{role: user|assistant|system, content: text}}")


# External formats ---------------------------------------------------------------------------------------

_LABELS = re.compile(r"^\s*(CritiqueRequest|RevisionRequest|Critique|Revision):\s*|\s*(Critique|Revision):\s*$")


def _strip_labels(text: str) -> str:
    """'\\n\\nCritiqueRequest: Identify ...\\n\\nCritique:' -> 'Identify ...'."""
    return _LABELS.sub("", text.strip()).strip()


def from_external(data, path: Path) -> Constitution:
    name = path.stem
    if isinstance(data, dict) and "constitutions" in data:
        return _from_llm_swarm(data, name)
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "edit_request" in v for v in data.values()):
        principles = [
            CritiquePrinciple(key, _strip_labels(value["prompt"][0] if isinstance(value["prompt"], list)
                                                 else value["prompt"]), _strip_labels(value["edit_request"]))
            for key, value in data.items()
        ]
        return Constitution(name, critique_revision=principles)
    if isinstance(data, dict) and "name" in data:  # our own format, written as JSON by `convert -o x.json`
        return from_yaml_data(data, str(path))
    if isinstance(data, list) and data and all(isinstance(item, str) for item in data):
        if "CritiqueRequest:" in data[0]:
            return Constitution(name, few_shot=[_few_shot_from_transcript(item) for item in data])
        texts = [re.sub(r"\s*Options:\s*$", "", item.strip()) for item in data]
        return Constitution(name, comparison=[ComparisonPrinciple(f"{name}-{i}", t) for i, t in enumerate(texts)])
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        if all("corrects" in item for item in data):
            return Constitution(name, label_few_shot=[_label_from_choice(i, item) for i, item in enumerate(data)])
        if all("prompt" in item and "[[[" in item["prompt"] for item in data):
            return Constitution(name, label_few_shot=[_label_from_precog(item["prompt"]) for item in data])
    raise UsageError(
        f"{path}: not a constitution format caictl knows (our YAML, Anthropic's prompt files, "
        "or llm-swarm JSON with a 'constitutions' list)"
    )


def _from_llm_swarm(data: dict, name: str) -> Constitution:
    principles = [
        CritiquePrinciple(f"{name}-{i}", item["critic"].strip(), item["revision"].strip())
        for i, item in enumerate(data["constitutions"])
    ]
    shots = []
    # Each system_chat entry is one exchange: prompt, response, critique request, critique, revision
    # request, revision (six messages).
    for chat in data.get("system_chat", []):
        if len(chat) >= 6:
            *conversation, crit_req, crit, rev_req, rev = chat
            shots.append(FewShot(conversation, crit_req["content"], crit["content"], rev_req["content"],
                                 rev["content"]))
    return Constitution(name, critique_revision=principles, few_shot=shots)


_FEW_SHOT_PARTS = re.compile(r"\n\n(CritiqueRequest|Critique|RevisionRequest|Revision):[ ]?")


def _few_shot_from_transcript(text: str) -> FewShot:
    text = re.sub(r"\n\nHuman:\s*$", "", text)
    pieces = _FEW_SHOT_PARTS.split(text)
    conversation = parse_transcript(pieces[0])
    fields = dict(zip(pieces[1::2], (p.strip() for p in pieces[2::2])))
    return FewShot(conversation, fields.get("CritiqueRequest", ""), fields.get("Critique", ""),
                   fields.get("RevisionRequest", ""), fields.get("Revision", ""))


def _label_from_choice(index: int, item: dict) -> LabelExample:
    messages = parse_transcript(item["prompt"])
    messages = [m for m in messages if m["content"]]
    good, bad = item["corrects"][0].strip(), item["incorrects"][0].strip()
    # Alternate the better answer's slot so the examples teach no position preference.
    if index % 2 == 0:
        return LabelExample(messages, good, bad, "A")
    return LabelExample(messages, bad, good, "B")


_OPTION = re.compile(r"\(([AB])\)\s*\[\[\[(.*?)\]\]\]", re.S)


def _label_from_precog(prompt: str) -> LabelExample:
    """Anthropic's chain-of-thought labelling examples: an H:/A: conversation, two bracketed options, the
    reasoning after "Let's think step by step:", and "So the answer is: (X)"."""
    options = dict(_OPTION.findall(prompt))
    head = prompt.split("(A) [[[")[0]
    conversation = []
    for match in re.finditer(r"(?:^|\n)(H|A):\s*(.*?)(?=\n(?:H|A):|\n\n\{\}|\n\n[^\n]*\n \(A\)|\Z)", head, re.S):
        role = "user" if match.group(1) == "H" else "assistant"
        conversation.append({"role": role, "content": match.group(2).strip()})
    reasoning = prompt.split("Let's think step by step:", 1)[-1].split("\n\nHuman:", 1)[0].strip()
    answer = re.findall(r"answer is:\s*\(([AB])\)", prompt)
    return LabelExample(conversation, options.get("A", "").strip(), options.get("B", "").strip(),
                        answer[-1] if answer else "A", "", reasoning)


# Writing ------------------------------------------------------------------------------------------------


def convert(specs: list[str], out: str | None, name: str | None) -> None:
    """Merge `specs` into one constitution and write it to `out` in the format its suffix names (YAML or
    JSON), or as YAML to stdout when `out` is None or '-'."""
    to_text = to_yaml if out in (None, "-") else _writer_for(Path(out))  # an unknown suffix fails before any reading
    loaded = load(specs)
    if name:
        loaded.name = name
    text = to_text(loaded)
    if out in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(out).write_text(text, encoding="utf-8")


def _writer_for(path: Path):
    if path.suffix.lower() in YAML_SUFFIXES:
        return to_yaml
    if path.suffix.lower() == ".json":
        return to_json
    raise UsageError(f"{path}: cannot tell which format to write; name the output .yaml, .yml or .json")


def to_yaml(constitution: Constitution) -> str:
    import yaml

    return yaml.safe_dump(_as_data(constitution), sort_keys=False, allow_unicode=True, width=110)


def to_json(constitution: Constitution) -> str:
    return json.dumps(_as_data(constitution), ensure_ascii=False, indent=2) + "\n"


def _as_data(constitution: Constitution) -> dict:
    """Our format as plain data, fields in reading order, empty optional ones left out."""
    data = asdict(constitution)
    for principle in data["critique_revision"]:
        if not principle["examples"]:
            del principle["examples"]
    for example in data["label_few_shot"]:
        for key in ("principle", "reasoning"):
            if not example[key]:
                del example[key]
    return {key: data[key] for key in ("name", "version", "description", "critique_revision", "comparison",
                                       "few_shot", "label_few_shot") if data[key] or key == "name"}


def show(constitution: Constitution) -> None:
    """A readable listing on stdout: ids and texts, so users can pick --principles."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{constitution.name}[/bold] v{constitution.version} (hash {constitution.content_hash()})")
    if constitution.description:
        console.print(constitution.description)
    table = Table("id", "critique request", "revision request", "examples", title="critique / revision")
    for p in constitution.critique_revision:
        table.add_row(p.id, p.critique_request, p.revision_request, str(len(p.examples)))
    console.print(table)
    table = Table("id", "comparison principle", title="comparison")
    for p in constitution.comparison:
        table.add_row(p.id, p.text)
    console.print(table)
    console.print(f"{len(constitution.few_shot)} shared few-shot exchanges, "
                  f"{len(constitution.label_few_shot)} labelling examples")
