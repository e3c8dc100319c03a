"""inspect: exactly what a model sees at a stage's first model call, row by row, without running the model.

    caictl inspect red-team.jsonl --model Qwen/Qwen2.5-0.5B-Instruct --stage revise
    caictl inspect revisions.jsonl --model models/base --stage sft --json | jq .mask

revise, sample and label run their own code up to their first engine call, on an engine that has the hf
engine's tokenizer side and no weights: the request it receives is rendered and tokenized as the hf engine would,
recorded, and the stage stops there. So the view is the stage's own rendering (chat template, few-shot block,
judge's question and cue), never a copy of it. sft shows its training rows: the ids and the loss mask exactly as
the trainer gets them (1 = trained).

Per row: `text` (the rendered text the tokenizer reads, control text in content shown as written; a tokenizer
may drop whitespace next to its control tokens, as Phi-3's does after "<|user|>"), `ids`, `tokens`; sft adds
`mask`; label adds `choice_ids` and `choice_tokens` (the tokens read for " (A" and " (B") and `position` (the
index in `ids` whose logits give them). sample's rows are one request each (the n samples of a prompt share
it); label's the first question of each comparison (its first principle, first response in slot A).
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from caictl import settings
from caictl.data import control_text as tokens
from caictl.errors import UsageError

STAGES = ("revise", "sample", "label", "sft")
DIM, RESET = "\x1b[2m", "\x1b[0m"


@dataclass
class InspectConfig:
    file: str
    model: str | None = None
    stage: str = "revise"
    limit: int = 5  # rows shown (the first N of the file)
    constitution: str = "harmless"
    prompt_style: str = "auto"  # revise, sample: chat, transcript or auto, as those stages take it
    few_shot: bool = False  # label: the constitution's worked labelling examples first
    chat_template: str | None = None  # sft: the training template file, as `caictl sft --chat-template`
    json: bool = False

    def check(self) -> None:
        if self.stage not in STAGES:
            raise UsageError(f"--stage {self.stage}: choose one of {', '.join(STAGES)}")
        if self.limit < 1:
            raise UsageError(f"--limit {self.limit}: need at least 1 row")


def run(config: InspectConfig) -> list[dict]:
    config.check()
    model = settings.require_model(config.model)
    views = sft_views(config, model) if config.stage == "sft" else first_call_views(config, model)
    write(views, config.json)
    return views


# revise, sample, label: the stage's own code up to its first engine call ---------------------------------


class FirstCall(Exception):
    def __init__(self, views: list[dict]):
        super().__init__("first model call reached")
        self.views = views


class InspectingEngine:
    """The hf engine without weights: a call is rendered and tokenized as the hf engine would feed it to the
    model, then raised as FirstCall so that the stage stops there."""

    name = "hf"

    def __init__(self, model: str):
        from caictl.engines.hf import HFEngine

        self.hf = HFEngine(model, weights=False)
        self.model = model

    def supports_chat(self) -> bool:
        return self.hf.supports_chat()

    def chat_prompt(self, chat: list[dict]) -> str:
        return self.hf.chat_prompt(chat)

    def generate(self, chats, params, keys):
        if not self.supports_chat():
            raise UsageError(f"model {self.model!r} has no chat template; use --prompt-style transcript")
        return self.complete([self.hf.chat_prompt(chat) for chat in chats], params, keys)

    def complete(self, texts, params, keys):
        encoded = [self.hf._fit(ids, params.max_new_tokens) for ids in self.hf.encoder.encode(texts)]
        raise FirstCall([self._view(text, ids) for text, ids in zip(texts, encoded)])

    def choice_logprobs(self, texts, choices):
        views = [None] * len(texts)
        for sequence, _, reads, _ in self.hf.choice_rows(texts, choices):
            for t, _, ending in reads:
                if views[t] is None:
                    views[t] = self._view(texts[t], sequence)
                    views[t]["choice_ids"], views[t]["position"] = [], len(sequence) - 1
                # A choice whose tokens all sit in its own sequence (choices that differ in more than their
                # last token) is listed with those tokens.
                views[t]["choice_ids"].append(ending if ending is not None else sequence[-1])
        for view in views:
            view["choice_tokens"] = self.hf.tokenizer.convert_ids_to_tokens(view["choice_ids"])
        raise FirstCall(views)

    def _view(self, text: str, ids: list[int]) -> dict:
        return {"text": tokens.unmark(text), "ids": ids, "tokens": self.hf.tokenizer.convert_ids_to_tokens(ids)}


def first_call_views(config: InspectConfig, model: str) -> list[dict]:
    from caictl.stages import label, revise, sample

    engine = InspectingEngine(model)
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "out.jsonl")
        # One window holds every shown row: the first call then covers them all.
        common = dict(out=out, limit=config.limit, batch_size=config.limit)
        if config.stage == "revise":
            stage, stage_config, per_row = revise, revise.ReviseConfig(
                prompts=config.file, model=model, constitution=config.constitution,
                prompt_style=config.prompt_style, **common), 1
        elif config.stage == "sample":
            stage_config = sample.SampleConfig(prompts=config.file, model=model, prompt_style=config.prompt_style,
                                               **common)
            stage, per_row = sample, stage_config.n
        else:
            stage_config = label.LabelConfig(pairs=config.file, model=model, constitution=config.constitution,
                                             few_shot=config.few_shot, **common)
            stage, per_row = label, stage_config.principles_per_pair * (2 if stage_config.debias else 1)
        try:
            stage.run(stage_config, engine=engine)
        except FirstCall as call:
            return call.views[::per_row]
    return []  # every row was already done (nothing reaches the model)


# sft: the training rows ---------------------------------------------------------------------------------


def sft_views(config: InspectConfig, model: str) -> list[dict]:
    from transformers import AutoTokenizer

    from caictl.stages import sft

    sources = sft.load_sources(sft.SFTConfig(revisions=[config.file], out="-", model=model))
    examples = sources[0][2][: config.limit]
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except OSError as error:
        raise UsageError(f"cannot load the tokenizer of {model!r} ({str(error).splitlines()[0]})")
    training, source = sft.training_template(tokenizer, model, config.chat_template)
    views = []
    for example, row in zip(examples, sft.tokenize(examples, tokenizer, training, source)):
        ids = row["input_ids"]
        views.append({"text": tokenizer.apply_chat_template(example, chat_template=training, tokenize=False),
                      "ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids),
                      "mask": [int(label != -100) for label in row["labels"]]})
    return views


# Output -------------------------------------------------------------------------------------------------


def write(views: list[dict], as_json: bool) -> None:
    if as_json:
        for view in views:
            sys.stdout.write(json.dumps(view, ensure_ascii=False) + "\n")
        return
    dim = sys.stdout.isatty()
    for number, view in enumerate(views, 1):
        lines = [f"--- row {number}: {len(view['ids'])} tokens", tokens.unmark(view["text"]), "", "tokens:"]
        cells = []
        for k, (token_id, token) in enumerate(zip(view["ids"], view["tokens"])):
            cell = f"{token_id}:{token!r}"
            if "mask" in view and not view["mask"][k]:
                cell = f"{DIM}{cell}{RESET}" if dim else f"({cell})"
            cells.append(cell)
        lines.append(" ".join(cells))
        if "mask" in view:
            lines.append(f"trained: {sum(view['mask'])} of {len(view['mask'])} tokens "
                         f"({'dimmed' if dim else 'in brackets'}: not trained)")
        if "choice_ids" in view:
            choices = ", ".join(f"{i}:{token!r}" for i, token in zip(view["choice_ids"], view["choice_tokens"]))
            lines.append(f"choices read: {choices}, from the logits at position {view['position']} "
                         f"(after {view['tokens'][view['position']]!r})")
        sys.stdout.write("\n".join(lines) + "\n\n")
