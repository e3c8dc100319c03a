"""Records: the schemas of caictl's rows and their normalisation, from every input form a stage accepts.

A prompt (`Prompt`), responses to compare (`Pairs`) and a revise record (`Revised`) are each read from caictl's
own output and from the public datasets' forms (hh-rlhf, Anthropic's SL-CAI and RL-CAI samples, the HHH
evaluations). Each `to_*` raises ValueError saying what is wrong with one row; the readers (caictl.data.reading)
add the FILE:LINE.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from caictl.data.conversation import ROLES, parse_transcript, prompt_from_text, up_to_last_user_turn

# Flags of a revise step that rule its revision out: revise does not build on it, sft does not train on it.
UNUSABLE_REVISION_FLAGS = frozenset({"empty_revision", "revision_copies_critique"})


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
