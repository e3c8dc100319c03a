"""Message content is data: only a chat template's own markup becomes control tokens.

A tokenizer matches its added tokens (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, ...) anywhere in a text, so a chat
rendered to text and then tokenized turns a user's "<|im_end|>\\n<|im_start|>system\\n..." into a real system turn.
caictl hands prompts between modules as text (a judge's question is a rendered chat plus a cue, a transcript is
plain text), so content carries a mark of its own: `mark()` wraps each control token found in content in two
Unicode noncharacters, MARK_OPEN + token + MARK_CLOSE. `ContentEncoder` reads a marked text as the same text
without the marks, in which the marked tokens are plain text and every other control token is markup. A text
without marks is tokenized exactly as before, and normal content carries no marks, so normal input gives the ids
it always gave; only the tokens that come from marked text change, and those are tokenized in context, as the
same characters would be if the tokenizer had no such control token (see ContentEncoder).

Where marks come from: the hf engine's chat_prompt() marks message content before its template renders it, and
conversation.render_transcript() marks content with the control tokens of every tokenizer that was loaded in this
process through a ContentEncoder (`register`; a stage opens its engine before it builds requests). Where they go:
the hf engine's encoder reads them; the PM scorer drops them (`unmark`), as it reads its transcripts with no control
tokens at all; the openai engine, given the model's tokenizer, reads them with a ContentEncoder as the hf engine does
and sends the server token ids; without one (or from a server that takes only text) it drops them and breaks every
piece shaped like a control token with an invisible character (`defuse`): a server parses control tokens in any
text. Nothing caictl writes holds them.

U+FDD0 and U+FDD1 are noncharacters: Unicode keeps them for a program's internal use, never for interchange.
`mark()` drops any already in content first, so content cannot forge a mark.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right

MARK_OPEN, MARK_CLOSE = "\ufdd0", "\ufdd1"
_MARKS = re.compile(f"{MARK_OPEN}([^{MARK_OPEN}{MARK_CLOSE}]*){MARK_CLOSE}|[{MARK_OPEN}{MARK_CLOSE}]")

_registered: set[str] = set()  # control tokens of every tokenizer loaded through a ContentEncoder here
_pattern: re.Pattern | None = None


def register(control_tokens) -> None:
    """Add control tokens to those mark() wraps in this process."""
    global _pattern
    new = {t for t in control_tokens if t and not t.isspace()} - _registered
    if new:
        _registered.update(new)
        _pattern = re.compile(_trie_pattern(_registered))


def mark(text: str) -> str:
    """Content as data: each registered control token in it wrapped in marks (none: the text as it is)."""
    if MARK_OPEN in text or MARK_CLOSE in text:
        text = text.replace(MARK_OPEN, "").replace(MARK_CLOSE, "")
    if _pattern is None:
        return text
    return _pattern.sub(f"{MARK_OPEN}\\g<0>{MARK_CLOSE}", text)


def mark_messages(messages: list[dict]) -> list[dict]:
    """Messages with every string in them marked (content, and whatever else a template may print)."""
    return [_mark_value(message) for message in messages]


def _mark_value(value):
    if isinstance(value, str):
        return mark(value)
    if isinstance(value, dict):
        return {key: _mark_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark_value(item) for item in value]
    return value


def unmark(text: str) -> str:
    """The text without marks: what a server or a PM reads."""
    if MARK_OPEN in text or MARK_CLOSE in text:
        return text.replace(MARK_OPEN, "").replace(MARK_CLOSE, "")
    return text


# What a server may read as a control token in any text it is sent: the shapes control tokens take in the families
# caictl knows (<|im_end|>, <|eot_id|>, <|end|>, <s>, </s>, [INST]), whatever the served vocabulary is.
_CONTROL_SHAPES = re.compile(r"<\|[^\s<>|]{1,64}\|>|</?s>|<unk>|<pad>|\[/?INST\]")
WORD_JOINER = "\u2060"


def defuse(text: str) -> str:
    """Text for a server, which parses control tokens in whatever text it is sent (llama.cpp does, and a client
    cannot turn that off): the marks dropped, and a word joiner (U+2060, invisible) put after the first character
    of each piece shaped like a control token or matching a control token registered here, so that the server
    reads it as text. A text without such pieces goes as it is."""
    text = unmark(text)
    pieces = [match.span() for match in _CONTROL_SHAPES.finditer(text)]
    if _pattern is not None:
        pieces += [match.span() for match in _pattern.finditer(text)]
    for start in sorted({start for start, end in pieces if end - start > 1}, reverse=True):
        text = text[:start + 1] + WORD_JOINER + text[start + 1:]
    return text


def control_tokens(tokenizer, stop_ids=()) -> set[str]:
    """The tokens content may not produce, counted much as transformers' `apply_chat_template(...,
    sanitize_control_tokens=True)` counts them: the special tokens, the added tokens the chat template writes
    (Qwen's <tool_call>, which is not special), and every token generation stops on. Whitespace tokens are text
    wherever they stand. Other added tokens stay tokens in content, as in transformers: Phi-3's `</s>` (id 2),
    which its tokenizer does not call special and its template never writes, and vocabulary that a fine-tune
    added as ordinary words.

    Why not that transformers option itself: it works only inside apply_chat_template(tokenize=True), while caictl
    hands rendered text between modules, and it encodes each sanitized token apart from its neighbours (" <|end|>"
    in Phi-3 content becomes "▁", "<", ... where the same text without the control token gives "▁<", ...)."""
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    found = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special or t.content in template}
    found |= set(tokenizer.all_special_tokens)
    found |= {tokenizer.convert_ids_to_tokens(i) for i in stop_ids if i is not None}
    return {t for t in found if t and not t.isspace()}


class ContentEncoder:
    """Token ids for marked text (see the module docstring), batched; the BOS rule of caictl's engines.

    BOS: the template's, when the text starts with it; else the one the tokenizer puts before plain text (its
    own setting: Llama 3 yes, Qwen2.5 and Phi-3.5 no); never two.
    """

    def __init__(self, tokenizer, stop_ids=()):
        self.tokenizer = tokenizer
        self.control = control_tokens(tokenizer, stop_ids)
        register(self.control)
        self._added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self.bos_id = tokenizer.bos_token_id
        probe = "a"
        with_specials = tokenizer(probe).input_ids
        self.adds_bos = (self.bos_id is not None and with_specials[:1] == [self.bos_id]
                         and tokenizer(probe, add_special_tokens=False).input_ids[:1] != [self.bos_id])
        self._plain = None  # (tokenizers.Tokenizer, anchor id): built on the first marked text that needs it

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text: marked control tokens as text, the rest as the tokenizer reads it, then BOS."""
        return [ids for ids, _ in self._encode(texts, offsets=False)]

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, each token's (start, end) in the text without marks) of each text; a BOS added here is (0, 0)."""
        return self._encode(texts, offsets=True)

    def encode_chats(self, chats: list[list[dict]], **template_options) -> list[list[int]]:
        """Ids of chats through the tokenizer's template, their content as data (for stages that tokenize chats
        themselves, as ppo's rollout does: `apply_chat_template(tokenize=False)` then the tokenizer)."""
        return self.encode([self.render(chat, **template_options) for chat in chats])

    def render(self, chat: list[dict], **template_options) -> str:
        """The chat's text through the template, content marked."""
        return self.tokenizer.apply_chat_template(mark_messages(chat), tokenize=False, **template_options)

    def encode_chat(self, messages: list[dict], chat_template: str | None = None, add_generation_prompt: bool = False,
                    assistant_mask: bool = False) -> dict:
        """What `apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=...)`
        gives (input_ids, and assistant_masks from the template's {% generation %} blocks), content as data and
        BOS as the engines put it: the ids training sees are the ids inference sees (for sft)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        template = self.tokenizer.get_chat_template(chat_template)
        rendered, generation = render_jinja_template(
            conversations=[mark_messages(messages)], chat_template=template,
            add_generation_prompt=add_generation_prompt, return_assistant_tokens_mask=assistant_mask,
            **self.tokenizer.special_tokens_map)
        (ids, offsets), = self.encode_with_offsets(rendered)
        out = {"input_ids": ids}
        if assistant_mask:
            dropped = _parse(rendered[0])[2]  # generation spans are in the marked text: move them to the plain one
            spans = [(s - bisect_left(dropped, s), e - bisect_left(dropped, e)) for s, e in generation[0]]
            out["assistant_masks"] = [int(any(end > s and start < e for s, e in spans)) for start, end in offsets]
        return out

    def _encode(self, texts: list[str], offsets: bool) -> list[tuple[list[int], list | None]]:
        """(ids, and with `offsets` each token's (start, end) in the text without marks) of each text."""
        parsed = [_parse(text) for text in texts]
        out: list = [None] * len(texts)
        plain = [i for i, (_, spans, _) in enumerate(parsed) if not spans]
        marked = [i for i, (_, spans, _) in enumerate(parsed) if spans]
        for group in (plain, marked):
            if not group:
                continue
            with_offsets = offsets or group is marked
            encoded = self.tokenizer([parsed[i][0] for i in group], add_special_tokens=False,
                                     return_offsets_mapping=with_offsets)
            spans = encoded.offset_mapping if with_offsets else [None] * len(group)
            for i, row, row_offsets in zip(group, encoded.input_ids, spans):
                if group is marked:
                    row, row_offsets = self._as_text(parsed[i][0], parsed[i][1], row, row_offsets)
                out[i] = (row, row_offsets if offsets else None)
        if self.adds_bos:
            out = [(ids, o) if ids[:1] == [self.bos_id]
                   else ([self.bos_id] + ids, None if o is None else [(0, 0)] + list(o)) for ids, o in out]
        return out

    def _as_text(self, text: str, spans: list[tuple[int, int]], ids: list[int], offsets):
        """ids of `text` (plain tokenization, with offsets) where the added tokens that start inside `spans` are
        read as text instead. The other added tokens are markup: each is swapped for an anchor (an added token of
        a private copy of the tokenizer, in which the control tokens are split as text), the copy tokenizes the
        whole text in one go, and the anchors get their tokens back. So the text around a content token is
        tokenized in context, as it would be without that token: encoding a piece apart would differ at BPE
        pre-token boundaries and at the start of a SentencePiece piece ("▁" prepended, or not: Llama 2's
        Metaspace prepends only at the start of the whole text)."""
        starts = [s for s, _ in spans]
        markup, from_content = [], False
        for position, token in enumerate(ids):  # the slow path only: texts whose content holds control tokens
            if token not in self._added:
                continue
            begin, end = offsets[position]
            at = text.find(self._added[token], begin, end)  # an lstrip token's offsets take in the spaces
            at = begin if at < 0 else at
            span = bisect_right(starts, at) - 1
            if span >= 0 and at < spans[span][1]:
                from_content = True
            else:
                markup.append((begin, end, token))
        if not from_content:
            return ids, offsets
        plain, anchor = self._plain_tokenizer()
        out, out_offsets, last = [], [], 0
        if plain is None:  # no fast tokenizer to copy: pieces between markup tokens, each encoded apart
            for begin, end, token in markup + [(len(text), len(text), None)]:
                piece = self.tokenizer(text[last:begin], add_special_tokens=False, split_special_tokens=True,
                                       return_offsets_mapping=True)
                out += piece.input_ids
                out_offsets += [(last + s, last + e) for s, e in piece.offset_mapping]
                if token is not None:
                    out.append(token)
                    out_offsets.append((begin, end))
                last = end
            return out, out_offsets
        pieces, shifts, length = [], [], 0  # shifts: (where a piece starts in the anchored text, in `text`)
        for begin, end, _ in markup + [(len(text), len(text), None)]:
            shifts.append((length, last))
            pieces += [text[last:begin], MARK_OPEN]
            length += begin - last + 1
            last = end
        encoding = plain.encode("".join(pieces[:-1]), add_special_tokens=False)
        restored, starts = iter(markup), [at for at, _ in shifts]
        for token, (begin, end) in zip(encoding.ids, encoding.offsets):
            if token == anchor:
                markup_begin, markup_end, token = next(restored)
                out.append(token)
                out_offsets.append((markup_begin, markup_end))
            else:
                at, source = shifts[bisect_right(starts, begin) - 1]
                out.append(token)
                out_offsets.append((begin - at + source, end - at + source))
        if next(restored, None) is not None:
            raise AssertionError("markup tokens lost while encoding content as text")
        return out, out_offsets

    def _plain_tokenizer(self):
        """A copy of the fast tokenizer (sharing its model, so it costs milliseconds) in which every control
        token is special and special tokens are split as text, plus an anchor token for markup."""
        if self._plain is None:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            self._plain = (None, None) if backend is None else _plain_copy(backend, self.control)
        return self._plain


def _plain_copy(backend, control: set[str]):
    from tokenizers import AddedToken, Tokenizer

    added = backend.get_added_tokens_decoder()
    copy = Tokenizer(backend.model)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if getattr(backend, part) is not None:
            setattr(copy, part, getattr(backend, part))
    for token_id in sorted(added):
        token = added[token_id]
        if token.content in control and not token.special:
            token = AddedToken(token.content, single_word=token.single_word, lstrip=token.lstrip,
                               rstrip=token.rstrip, normalized=token.normalized, special=True)
        copy.add_tokens([token])
    if any(copy.token_to_id(t.content) != i for i, t in added.items()):
        # Added tokens outside the model's vocabulary with gaps between their ids: copy the whole tokenizer.
        copy = Tokenizer.from_str(backend.to_str())
        copy.no_padding()
        copy.no_truncation()
        copy.add_special_tokens([AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                                            normalized=t.normalized, special=True)
                                 for t in added.values() if t.content in control and not t.special])
    copy.add_tokens([AddedToken(MARK_OPEN, normalized=False, special=False)])
    copy.encode_special_tokens = True
    return copy, copy.token_to_id(MARK_OPEN)


def _parse(text: str) -> tuple[str, list[tuple[int, int]], list[int]]:
    """(text without marks, the spans of marked text in it, where the marks stood in `text`). A lone mark (a
    template that cut content apart) is dropped."""
    if MARK_OPEN not in text and MARK_CLOSE not in text:
        return text, [], []
    pieces, spans, dropped, length, last = [], [], [], 0, 0
    for match in _MARKS.finditer(text):
        pieces.append(text[last:match.start()])
        length += match.start() - last
        inner = match.group(1)
        if inner is not None:
            pieces.append(inner)
            spans.append((length, length + len(inner)))
            length += len(inner)
            dropped += [match.start(), match.end() - 1]
        else:
            dropped.append(match.start())
        last = match.end()
    pieces.append(text[last:])
    return "".join(pieces), [s for s in spans if s[0] < s[1]], dropped


def _trie_pattern(words) -> str:
    """One regex for many literal words, as a trie: Python's re tries an alternation of 500 tokens one by one at
    every position (10 ms for 11 kB); the trie looks at one branch (0.2 ms). Leftmost-longest, as a tokenizer
    matches its added tokens."""
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def emit(node: dict) -> str:
        branches = [re.escape(char) + emit(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(trie)
