"""Text a chat template wrote, read back into messages: for any template, learned from the template itself.

A policy's rollouts reach a reward server as text (OpenRLHF posts each prompt + response decoded with its special
tokens), while caictl's preference models read transcripts of messages. `ChatFormat.learn(tokenizer)` renders probe
conversations, whose contents are unique markers, through the tokenizer's own chat template and keeps the text the
template writes around them:

    heads       what comes before the first message's content, with and without a system message; a template's
                default system prompt (Qwen2.5's "You are Qwen, ...") and date header (Llama 3.1) are part of the head
    separators  what comes between a message's content and the next one's, for each role that follows another
    tail        what follows the last assistant message (its end-of-turn token, maybe more)

`parse(text)` walks a text with those strings. Turns alternate (an optional system message, then user, assistant,
user, ...) and the text ends with an assistant message. At the ends it takes what rollouts carry: any number of BOS
and padding tokens first (a tokenizer that adds BOS to a template that writes one gives two), and after the last
response any end of the template's tail cut at a token boundary (rollouts stop at the end-of-turn token), followed
by EOS or padding tokens. No rules per family: a template this cannot read back (a system prompt merged into the
first user turn, turns rendered differently by position) fails `learn()` with a message, not a wrong parse.

What a text cannot say: a system message equal to the template's default reads as no system message (the two
render alike; the transcript then has none, as for a conversation sent without one), and whitespace a template
trims from content (Llama 3's `| trim`) is gone. Content that itself holds a separator's text is split there, as
the policy's tokenizer would read it as markup too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from caictl.errors import UsageError

# Who speaks after whom: an optional system message opens, then user and assistant take turns.
NEXT_ROLE = {"system": "user", "user": "assistant", "assistant": "user"}


class ParseError(ValueError):
    """A text that is not a conversation in this chat format; the message says where it stops fitting."""


@dataclass(frozen=True)
class ChatFormat:
    heads: tuple[tuple[str, str], ...]  # (text before the first content, the first message's role), longest first
    separators: dict[tuple[str, str], str]  # (role, next role) -> text between their contents
    tails: tuple[str, ...]  # what may follow the last response: the template's tail cut at token boundaries
    leading: tuple[str, ...]  # tokens a text may start with, any number of them (BOS, padding)
    trailing: tuple[str, ...]  # tokens it may end with, any number of them (EOS, padding)

    @classmethod
    def learn(cls, tokenizer, name: str = "the policy") -> ChatFormat:
        """The format of the tokenizer's chat template; UsageError when the template cannot be read back."""
        if not isinstance(getattr(tokenizer, "chat_template", None), str):
            raise UsageError(f"{name} has no chat template to read queries with; serve without --policy and send "
                             "transcripts (caictl.models.pm.conversation_text)")
        strip = [t for t in (tokenizer.bos_token, tokenizer.pad_token) if t]
        end = [t for t in (tokenizer.eos_token, tokenizer.pad_token) if t]
        try:
            exchange = _probe(["user", "assistant", "user", "assistant"])
            pieces = _pieces(_render(tokenizer, exchange), exchange, strip)
        except Exception as error:  # whatever a template raises (jinja2's TemplateError, its raise_exception)
            raise UsageError(f"{name}: its chat template did not render a probe conversation ({error})")
        head, user_assistant, assistant_user, again, tail = pieces
        separators = {("user", "assistant"): user_assistant, ("assistant", "user"): assistant_user}
        heads = [(head, "user")]
        try:
            # Templates without system messages raise on one (Gemma) or leave it out (caught by _pieces).
            with_system = _probe(["system", "user", "assistant", "user", "assistant"])
            system_pieces = _pieces(_render(tokenizer, with_system), with_system, strip)
        except Exception:
            system_pieces = None
        if system_pieces is not None and system_pieces[2:] == pieces[1:]:
            heads.append((system_pieces[0], "system"))
            separators[("system", "user")] = system_pieces[1]
        if again != user_assistant:
            raise UsageError(f"{name}: its chat template writes a later turn differently from the first "
                             f"({user_assistant!r} then {again!r}); serve without --policy and send transcripts")
        layout = cls(heads=tuple(sorted(heads, key=lambda h: -len(h[0]))), separators=separators,
                     tails=_token_prefixes(tail, _added_tokens(tokenizer)), leading=tuple(strip),
                     trailing=tuple(end))
        layout._check(tokenizer, name)
        return layout

    def parse(self, text: str) -> list[dict]:
        """The messages a text holds, ending with the assistant's; ParseError says where the text stops fitting."""
        text = _strip_tokens(text, self.leading, self.trailing)
        for head, role in self.heads:
            if text.startswith(head):
                break
        else:
            starts = " or ".join(f"{head!r} ({'a system message' if role == 'system' else 'no system message'})"
                                 for head, role in self.heads)
            raise ParseError(f"does not start as the chat template starts a conversation: {starts}")
        position, messages = len(head), []
        while True:
            following = NEXT_ROLE[role]
            separator = self.separators[(role, following)]
            end = text.find(separator, position)
            if end < 0:
                if role != "assistant":
                    raise ParseError(f"ends inside a {role} message (no {separator!r} after it): no response")
                content = text[position:]
                tail = next(t for t in self.tails if content.endswith(t))  # "" is the last of them
                messages.append({"role": "assistant", "content": content[:len(content) - len(tail)]})
                return messages
            messages.append({"role": role, "content": text[position:end]})
            position, role = end + len(separator), following

    def _check(self, tokenizer, name: str) -> None:
        """Read back conversations rendered as a trainer renders them: whole, and as a prompt with its generation
        cue followed by the response, with or without EOS."""
        shapes = [["user", "assistant"], ["user", "assistant", "user", "assistant"]]
        if any(role == "system" for _, role in self.heads):
            shapes.append(["system", "user", "assistant"])
        for roles in shapes:
            conversation = _probe(roles)
            prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
            response = conversation[-1]["content"]
            for text in (_render(tokenizer, conversation), prompt + response,
                         prompt + response + (tokenizer.eos_token or "")):
                try:
                    parsed = self.parse(text)
                except ParseError as error:
                    parsed = str(error)
                if parsed != conversation:
                    raise UsageError(f"{name}: its chat template cannot be read back into messages ({text!r} read "
                                     f"as {parsed!r}); serve without --policy and send transcripts")


def _probe(roles: list[str]) -> list[dict]:
    # Letters only, so that a template prints them as they are (nothing to trim or escape); each unique in a rendering.
    return [{"role": role, "content": f"caictlprobe{chr(ord('a') + i)}{role}"} for i, role in enumerate(roles)]


def _render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _pieces(text: str, messages: list[dict], leading: list[str]) -> list[str]:
    """The text around each message's content: before the first, between each two, after the last."""
    text = _strip_tokens(text, leading, ())
    pieces, position = [], 0
    for message in messages:
        at = text.find(message["content"], position)
        if at < 0 or text.count(message["content"]) != 1:
            raise ParseError(f"the {message['role']} message is not in the rendered text once, in order")
        pieces.append(text[position:at])
        position = at + len(message["content"])
    return pieces + [text[position:]]


def _strip_tokens(text: str, leading, trailing) -> str:
    changed = True
    while changed:
        changed = False
        for token in leading:
            if text.startswith(token):
                text, changed = text[len(token):], True
        for token in trailing:
            if text.endswith(token):
                text, changed = text[:-len(token)], True
    return text


def _added_tokens(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.content.strip()]


def _token_prefixes(tail: str, tokens: list[str]) -> tuple[str, ...]:
    """The tail cut after each added token in it and after each run of text between them, longest first, down to ""
    (a rollout ends where generation stopped: after the end-of-turn token, or before it when cut off)."""
    if not tokens:
        return (tail, "") if tail else ("",)
    pieces = [p for p in re.split("(" + "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) + ")", tail)
              if p]
    return tuple("".join(pieces[:n]) for n in range(len(pieces), -1, -1))
