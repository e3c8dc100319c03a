"""Conversations: chat messages <-> Anthropic-style "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts.

Base models (no chat template) are prompted with transcripts, as in the paper; chat models get messages
through their own template. Message content is always treated as data: nothing here formats it as a
template, so prompts containing `{`, `{{x}}` or `{% raw %}` pass through literally, and a rendered transcript
marks any control token inside content (`<|im_end|>`, ...) so that the hf engine reads it as text
(caictl.data.control_text).
"""

from __future__ import annotations

import re

from caictl.data import control_text as tokens

ROLES = ("system", "user", "assistant")
TRANSCRIPT_NAMES = {"user": "Human", "assistant": "Assistant"}
# A turn marker: two newlines, the speaker, a colon. hh-rlhf sometimes omits the space after the colon.
_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_transcript(text: str) -> list[dict]:
    """Split an hh-rlhf style transcript into messages. Text before the first turn becomes a system message."""
    parts = _TURN.split(text)
    messages = []
    head = parts[0].strip()
    if head:
        messages.append({"role": "system", "content": head})
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        messages.append({"role": role, "content": content.strip()})
    return messages


def prompt_from_text(text: str) -> list[dict]:
    """A prompt given as one string: a transcript when it starts with a human turn, else one user message.

    Only a leading turn marks a transcript: Anthropic's HHH evaluation prompts quote "Human:" inside a question
    that is itself one user message."""
    if not text.startswith(("\n\nHuman:", "Human:")):
        return [{"role": "user", "content": text}]
    messages = parse_transcript(text if text.startswith("\n") else "\n\n" + text)
    # A closing "\n\nAssistant:" is the cue for the reply, not a turn of its own.
    if messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()
    return messages


def render_transcript(messages: list[dict], open_assistant_turn: bool = False) -> str:
    """Messages as an Anthropic transcript; optionally end with an open "\\n\\nAssistant:" cue. Control tokens in
    content come out marked (caictl.data.control_text.mark: invisible unless content holds one; engines read or
    drop them)."""
    text = ""
    for message in messages:
        if message["role"] == "system":
            text += tokens.mark(message["content"])
        else:
            text += f"\n\n{TRANSCRIPT_NAMES[message['role']]}: {tokens.mark(message['content'])}"
    if open_assistant_turn:
        text += "\n\nAssistant:"
    return text


def up_to_last_user_turn(messages: list[dict]) -> list[dict]:
    """The conversation a prompt stands for: everything up to and including the last user message."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "user":
            return messages[: index + 1]
    return []
