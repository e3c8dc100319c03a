"""Training on chats: the chat template with `{% generation %}` markers, tokenised examples and their
assistant-only loss mask.

The template comes from, in order: `--chat-template FILE`, the model's own when it has the markers, TRL's
training version of it, or caictl's (`chat_templates/`). `tokenize` renders each conversation through it and
`assistant_labels` cuts the marked spans to the assistant's content and the end-of-turn token that closes it,
so only those tokens carry loss. `caictl sft` trains on these rows, `caictl dpo` on the pairs `preference_rows` cuts
from them; `caictl inspect --stage sft|dpo` shows them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import re
from pathlib import Path

from caictl.data.control_text import ContentEncoder
from caictl.errors import UsageError

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")  # also {%- generation %}, as TRL matches it
# Training templates caictl writes itself, for originals TRL has none for: sha256 of the original template's
# text (as the tokenizer holds it) -> file in caictl/chat_templates/.
SHIPPED_TRAINING_TEMPLATES = {
    # Llama 3.1 (Meta's template as trl/chat_templates/llama3_1.jinja holds it; `caictl init-model --family llama3`)
    "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65": "llama3_1_training.jinja",
}


def training_template(tokenizer, model_name: str, chat_template_file: str | None) -> tuple[str, dict]:
    """The chat template whose {% generation %} blocks mark the assistant tokens, and where it came from.

    In order: --chat-template FILE; the model's own template when it has markers; TRL's training version of it
    (TRL recognises its stored originals by exact text); caictl's own training version (same, by hash)."""
    from trl.chat_template_utils import get_training_chat_template

    original = chat_template_text(tokenizer.chat_template)
    if chat_template_file:
        text = Path(chat_template_file).read_text(encoding="utf-8")
        return text, {"source": "--chat-template", "path": str(chat_template_file), "sha256": template_sha256(text)}
    if not original:
        raise UsageError(f"{model_name!r} has no chat template; pass --chat-template FILE: a Jinja chat template "
                         "with {% generation %} ... {% endgeneration %} around each assistant message's content "
                         "and the end-of-turn token after it")
    if GENERATION_MARKER.search(original):
        return original, {"source": "model", "sha256": template_sha256(original)}
    try:
        text = get_training_chat_template(tokenizer)
    except ValueError:  # TRL has no training version of this template
        text = None
    if text:
        return text, {"source": "trl", "file": _trl_template_file(text),
                      "trl_version": importlib.metadata.version("trl"), "sha256": template_sha256(text)}
    shipped = SHIPPED_TRAINING_TEMPLATES.get(template_sha256(original))
    if shipped:
        text = shipped_template(shipped)
        return text, {"source": "caictl", "file": f"caictl/chat_templates/{shipped}", "sha256": template_sha256(text)}
    raise UsageError(
        f"the chat template of {model_name!r} has no {{% generation %}} markers, and neither TRL nor caictl has a "
        "training version of it, so the assistant tokens cannot be told apart for an assistant-only loss; pass "
        "--chat-template FILE: a copy of the model's template with {% generation %} ... {% endgeneration %} around "
        "each assistant message's content and the end-of-turn token after it"
    )


def shipped_template(name: str) -> str:
    from importlib import resources

    return (resources.files("caictl") / "chat_templates" / name).read_text(encoding="utf-8")


def tokenize(examples: list[list[dict]], tokenizer, template: str, source: dict) -> list[dict]:
    """input_ids and labels per conversation: tokenized as SFTTrainer would (one apply_chat_template call through
    the training template), except that message content is data (a "<|im_end|>" written in a message is text, as
    the engines read it at inference); the assistant mask cut by assistant_labels."""
    encoder = ContentEncoder(tokenizer)
    markup = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    header = _assistant_header(tokenizer, template)

    @functools.cache
    def blank(token_id: int) -> bool:
        return token_id not in markup and not tokenizer.decode([token_id]).strip()

    rows = []
    for number, messages in enumerate(examples, 1):
        out = encoder.encode_chat(messages, chat_template=template, assistant_mask=True)
        try:
            labels = assistant_labels(out["input_ids"], out["assistant_masks"], markup, header, blank)
        except ValueError as error:
            raise UsageError(f"training example {number}: {error}, with the chat template {describe_template(source)}; "
                             "pass --chat-template FILE with {% generation %} ... {% endgeneration %} around each "
                             "assistant message's content and the end-of-turn token after it") from None
        rows.append({"input_ids": out["input_ids"], "labels": labels})
    return rows


def preference_rows(pairs: list[dict], tokenizer, template: str, source: dict) -> list[dict]:
    """prompt_ids, chosen_ids and rejected_ids per pair (prompt: messages; chosen, rejected: the one assistant message
    that answers it), the rows TRL's DPO collator takes: it trains on every completion id and on nothing else.

    Each side is tokenized as sft tokenizes a conversation (`tokenize`: the training template, content as data), and
    its completion is its last trained span, the answer and the end-of-turn token that closes it (not the whitespace
    the template writes after that token); the prompt is all before it, the generation prompt the model answers at
    inference. Where an answer's first token takes in the header's end (BPE merges "\n" + "\n\n"), both
    completions start where the two sides' ids part, as TRL's own tokenization starts them."""
    conversations = [pair["prompt"] + pair[side] for pair in pairs for side in ("chosen", "rejected")]
    rows = []
    tokenized = tokenize(conversations, tokenizer, template, source)
    for chosen, rejected in zip(tokenized[::2], tokenized[1::2]):
        (chosen_start, chosen_end), (rejected_start, rejected_end) = map(_last_span, (chosen, rejected))
        start = min(chosen_start, rejected_start, _common_prefix(chosen["input_ids"], rejected["input_ids"]))
        rows.append({"prompt_ids": chosen["input_ids"][:start], "chosen_ids": chosen["input_ids"][start:chosen_end],
                     "rejected_ids": rejected["input_ids"][start:rejected_end]})
    return rows


def _last_span(row: dict) -> tuple[int, int]:
    """(start, end) of the last run of trained tokens (tokenize leaves at least one)."""
    labels = row["labels"]
    end = max(k for k, label in enumerate(labels) if label != -100) + 1
    start = end - 1
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    return start, end


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _assistant_header(tokenizer, template: str) -> list[int]:
    """The assistant header's tokens: what the generation prompt adds after a user turn (the prompt's last
    tokens at inference)."""
    probe = [{"role": "user", "content": "x"}]
    ids = [tokenizer.apply_chat_template(probe, chat_template=template, tokenize=True, return_dict=True,
                                         add_generation_prompt=prompt)["input_ids"] for prompt in (False, True)]
    start = next((k for k, (a, b) in enumerate(zip(*ids)) if a != b), min(map(len, ids)))
    return ids[1][start:]



def assistant_labels(ids: list[int], mask: list[int], markup: set[int], header: list[int], blank) -> list[int]:
    """Labels for one tokenized conversation: the tokens of each span the mask marks, cut to the assistant's
    content and the end-of-turn token that closes it; -100 elsewhere.

    transformers marks the tokens that overlap a generation block, and the blocks of TRL's training templates
    hold more than that: Qwen2.5's starts on the newline of the `<|im_start|>assistant\n` header, which is prompt
    at inference; Phi-3.5's last turn is followed by eos in a block of its own (`<|end|>` again, caictl's
    end-of-turn token); both end on whitespace after the end-of-turn token. So a span loses the header tokens
    it starts with (header: the tokens the generation prompt adds, found in place), and ends on the first special
    token (markup) after its last content token, which is neither special nor whitespace (blank(id)).
    Whitespace is cut only there: a SentencePiece answer may well start on a lone "▁" the model must write.
    A span that does not end on a special token (the template left the end-of-turn token out of its block) is a
    ValueError, as is a conversation with no span: the model would never learn to stop.
    """
    labels = [-100] * len(ids)
    spans = 0
    k = 0
    while k < len(ids):
        if not mask[k]:
            k += 1
            continue
        start = end = k
        while end < len(ids) and mask[end]:
            end += 1
        k = end
        start += _header_tokens_at(ids, start, end, header)
        while end > start and blank(ids[end - 1]):
            end -= 1
        if end == start:
            continue  # a block of header or whitespace alone
        if ids[end - 1] not in markup:
            raise ValueError("an assistant turn's end-of-turn token is outside the template's generation block")
        tail = end - 1  # walks back to the first token after the content: whitespace and special tokens from there
        while tail > start and (ids[tail - 1] in markup or blank(ids[tail - 1])):
            tail -= 1
        end = next(i for i in range(tail, end) if ids[i] in markup) + 1
        labels[start:end] = ids[start:end]
        spans += 1
    if not spans:
        raise ValueError("the template's generation blocks mark no assistant token")
    return labels


def _header_tokens_at(ids: list[int], start: int, end: int, header: list[int]) -> int:
    """How many of the span's first tokens are the end of a whole assistant header that starts at or before it."""
    for m in range(min(len(header), end - start), 0, -1):
        before = len(header) - m
        if start >= before and ids[start - before:start + m] == header:
            return m
    return 0


def chat_template_text(template) -> str | None:
    """A tokenizer's chat_template as one text (a template shipped as named variants: its default)."""
    return template.get("default") if isinstance(template, dict) else template


def _trl_template_file(text: str) -> str | None:
    import trl

    folder = Path(trl.__file__).parent / "chat_templates"
    return next((p.name for p in sorted(folder.glob("*_training.jinja")) if p.read_text(encoding="utf-8") == text),
                None)


def describe_template(source: dict) -> str:
    return {"--chat-template": f"from --chat-template {source.get('path')}",
            "model": "the model's own (it has {% generation %} markers)",
            "trl": f"TRL's training version {source.get('file')}",
            "caictl": f"caictl's training version {source.get('file')}"}[source["source"]]


def template_sha256(text: str | None) -> str | None:
    return hashlib.sha256(text.encode("utf-8")).hexdigest() if text is not None else None
