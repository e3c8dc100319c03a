r"""inspect: exactly what a model sees at a stage's first model call (or every call), row by row, without running
the model.

    caictl inspect red-team.jsonl --model Qwen/Qwen2.5-0.5B-Instruct
    caictl inspect red-team.jsonl --model models/tiny --stage revise \
        --call all --rounds 2 --limit 1
    caictl inspect revisions.jsonl --model models/base --stage sft --json \
        | jq .mask
    caictl inspect prefs.jsonl --model models/sl-cai --stage dpo --limit 1

revise, sample and label run their own code up to their first engine call, on an engine that has the hf
engine's tokenizer side and no weights: the request it receives is rendered and tokenized as the hf engine would,
recorded, and the stage stops there. So the view is the stage's own rendering (chat template, few-shot block,
judge's question and cue), never a copy of it. sft and dpo show their training rows: the ids and the loss mask
exactly as the trainer gets them (1 = trained); dpo's two rows a pair, the prompt's ids followed by the chosen
response's, then by the rejected one's (each with its `side`), the pairs that --min-p-chosen keeps at its default.

Per row: `text` (the rendered text the tokenizer reads, control text in content shown as written; a tokenizer
may drop whitespace next to its control tokens, as Phi-3's does after "<|user|>"), `ids`, `tokens`; sft and dpo
add `mask`; label adds `choice_ids` and `choice_tokens` (the tokens read for " (A" and " (B") and `position` (the
index in `ids` whose logits give them). sample's rows are one request each (the n samples of a prompt share
it); label's the first question of each comparison (its first principle, first response in slot A).

`--call all` lets the stage run to its end instead: every call is recorded and answered with a visible placeholder
("<model output: critique, round 1>") that the stage then builds its next requests on, exactly as it would on the
model's text. revise shows per row the answer request, then each round's critique and revision requests; label
every question of a comparison (each principle drawn, each order with --debias), after its reasoning requests
with --cot. Each view then also says its `row`, `call` (1, 2, ... within the row) and `request`.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from caictl import settings
from caictl.data import control_text as tokens
from caictl.engines.base import ChoiceScores, Generation
from caictl.errors import UsageError
from caictl.models import kind as model_kind
from caictl.models.chat_training import tokenize, training_template
from caictl.options import INPUT_OUTPUT, METHOD, common, option
from caictl.stages import dpo, label, revise, sample, sft
from caictl.ui import console

STAGES = ("revise", "sample", "label", "sft", "dpo")
TRAINING_STAGES = ("sft", "dpo")  # shown as training rows, not model calls
CALLS = ("first", "all")
DIM, RESET = "\x1b[2m", "\x1b[0m"


@dataclass
class InspectConfig:
    file: str = option(help="The stage's input file (prompts, pairs or revisions).", panel=INPUT_OUTPUT,
                       argument=True)
    model: str | None = common("model", None, help="Model folder or hub id: its tokenizer only is loaded.")
    stage: str = option("revise", "The stage whose first model call is shown: revise, sample or label; or whose "
                        "training rows: sft or dpo.", METHOD)
    call: str = option("first", "first: the stage's first model call; all: every call of a row (revise, label; "
                       "sample's only call is its first).", METHOD)
    rounds: int | None = option(None, "revise: critique -> revision rounds shown by --call all; unset: revise's.",
                                METHOD, settings="stage")
    limit: int = option(5, "Rows shown: the first N of the file.", INPUT_OUTPUT)
    constitution: str = common("constitution", "harmless")
    prompt_style: str = option("auto", "revise, sample: chat, transcript or auto, as those stages take it.", METHOD)
    few_shot: bool = option(False, "label: the constitution's worked labelling examples first.", METHOD)
    chat_template: str | None = option(
        None, "sft, dpo: a training chat template file, as `caictl sft|dpo --chat-template`.", METHOD)
    json: bool = option(False, "One JSON object a row: text, ids, tokens; mask (sft, dpo) or choice_ids and "
                               "position (label).", INPUT_OUTPUT, flag="--json")

    def check(self) -> None:
        if self.stage not in STAGES:
            raise UsageError(f"--stage {self.stage}: choose one of {', '.join(STAGES)}")
        if self.call not in CALLS:
            raise UsageError(f"--call {self.call}: choose one of {', '.join(CALLS)}")
        if self.call == "all" and self.stage in TRAINING_STAGES:
            raise UsageError(f"--call all: {self.stage} makes no model calls; its view is the training rows "
                             "(--call first)")
        if self.rounds is not None and (self.stage != "revise" or self.rounds < 1):
            raise UsageError(f"--rounds {self.rounds}: for --stage revise, at least 1")
        if self.limit < 1:
            raise UsageError(f"--limit {self.limit}: need at least 1 row")


def run(config: InspectConfig) -> list[dict]:
    config.check()
    model = settings.require_model(config.model)
    model_kind.require(model, "--model")  # a mistyped folder stops here, not after the hub loader's retries
    views = {"sft": sft_views, "dpo": dpo_views}.get(config.stage, first_call_views)(config, model)
    write(views, config.json)
    return views


# revise, sample, label: the stage's own code up to its first engine call ---------------------------------


class FirstCall(Exception):
    def __init__(self, views: list[dict]):
        super().__init__("first model call reached")
        self.views = views


class InspectingEngine:
    """The hf engine without weights: a call is rendered and tokenized as the hf engine would feed it to the
    model. With every_call False it is then raised as FirstCall so that the stage stops there; with every_call
    True it is recorded in `calls` and answered with placeholders, so that the stage goes on to its next call."""

    name = "hf"

    def __init__(self, model: str, every_call: bool = False):
        from caictl.engines.hf import HFEngine

        self.hf = HFEngine(model, weights=False)
        self.model = model
        self.every_call = every_call
        self.calls: list[list[dict]] = []  # per engine call, one view per text in call order

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
        views = [self._view(text, ids) | {"request": request_name(key)} for text, ids, key in zip(texts, encoded, keys)]
        self._record(views)
        return [Generation(placeholder(key), len(ids), 0, "stop") for key, ids in zip(keys, encoded)]

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
            view["request"] = "choice question"
        self._record(views)
        return ChoiceScores.uncut([[0.0] * len(choices) for _ in texts])  # even odds: no choice is favoured

    def _record(self, views: list[dict]) -> None:
        if not self.every_call:
            raise FirstCall([{k: v for k, v in view.items() if k != "request"} for view in views])
        self.calls.append(views)

    def _view(self, text: str, ids: list[int]) -> dict:
        return {"text": tokens.unmark(text), "ids": ids, "tokens": self.hf.tokenizer.convert_ids_to_tokens(ids)}


def first_call_views(config: InspectConfig, model: str) -> list[dict]:
    # sample makes one call per row (its n samples share the request): its first call is all of them.
    engine = InspectingEngine(model, every_call=config.call == "all" and config.stage != "sample")
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "out.jsonl")
        # One window holds every shown row: the first call then covers them all.
        common = dict(out=out, limit=config.limit, batch_size=config.limit)
        if config.stage == "revise":
            rounds = {} if config.rounds is None else {"rounds": config.rounds}
            stage, stage_config, per_row = revise, revise.ReviseConfig(
                prompts=config.file, model=model, constitution=config.constitution,
                prompt_style=config.prompt_style, **rounds, **common), 1
        elif config.stage == "sample":
            stage_config = sample.SampleConfig(prompts=config.file, model=model, prompt_style=config.prompt_style,
                                               **common)
            stage, per_row = sample, stage_config.n
        else:
            stage_config = label.LabelConfig(pairs=config.file, model=model, constitution=config.constitution,
                                             few_shot=config.few_shot, **common)
            stage, per_row = label, stage_config.principles_per_pair * (2 if stage_config.debias else 1)
        try:
            with console.capture():  # the stage's own summary of a run on placeholders is no news
                stage.run(stage_config, engine=engine)
        except FirstCall as call:
            return call.views[::per_row]
    views = every_call_views(engine.calls, per_row)
    if config.stage == "label":
        orders, seen = 2 if stage_config.debias else 1, {}
        for view in views:  # a row's questions: per principle drawn, the first response in slot A, then in B
            if view["request"] == "choice question":
                k = seen[view["row"]] = seen.get(view["row"], -1) + 1
                slot = "A" if k % orders == 0 else "B"
                view["request"] = f"choice question: principle {k // orders + 1}, first response in slot {slot}"
    return views


def every_call_views(calls: list[list[dict]], per_row: int) -> list[dict]:
    """Each call's texts are row after row (the stage batches the shown rows together), as many per row in every
    call as in the first: regroup them by row, in call order within it."""
    if not calls:
        return []  # every row was already done (nothing reaches the model)
    rows = len(calls[0]) // per_row
    views = []
    for row in range(rows):
        number = 0
        for call in calls:
            width = len(call) // rows
            for view in call[row * width:(row + 1) * width]:
                number += 1
                views.append({"row": row + 1, "call": number, **view})
    return views


def request_name(key: str) -> str:
    """What a revise call asks for, from its key (ID/initial, ID/ROUND/critique, ID/ROUND/revision); label's
    reasoning keys (ID/PRINCIPLE/ORDER) and others are shown as they are."""
    if key.endswith("/initial"):
        return "initial response"
    head, _, kind = key.rpartition("/")
    round_index = head.rpartition("/")[2]
    if kind in ("critique", "revision") and round_index.isdigit():
        return f"{kind}, round {int(round_index) + 1}"
    return f"reasoning {key}"


def placeholder(key: str) -> str:
    """The model output a later request is built on. Distinct per request kind: revise flags (and does not build
    on) a revision that is nearly its critique, so two placeholders must not read alike."""
    return f"<model output: {request_name(key)}>"


# sft: the training rows ---------------------------------------------------------------------------------


def sft_views(config: InspectConfig, model: str) -> list[dict]:
    sources = sft.load_sources(sft.SFTConfig(revisions=[config.file], out="-", model=model))
    examples = sources[0][2][: config.limit]
    tokenizer = _tokenizer(model)
    training, source = training_template(tokenizer, model, config.chat_template)
    views = []
    for example, row in zip(examples, tokenize(examples, tokenizer, training, source)):
        ids = row["input_ids"]
        views.append({"text": tokenizer.apply_chat_template(example, chat_template=training, tokenize=False),
                      "ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids),
                      "mask": [int(label != -100) for label in row["labels"]]})
    return views


# dpo: the training rows -------------------------------------------------------------------------------


def dpo_views(config: InspectConfig, model: str) -> list[dict]:
    """Per pair its chosen row, then its rejected row: the ids DPO's collator puts in a batch (prompt + response),
    mask 1 on the response, as it trains."""
    pairs, _ = dpo.read_pairs(dpo.DPOConfig(prefs=[config.file], out="-", model=model))
    pairs = pairs[: config.limit]
    tokenizer = _tokenizer(model)
    rows, training, _ = dpo.tokenize_pairs(pairs, tokenizer, model, config.chat_template)
    views = []
    for number, (pair, row) in enumerate(zip(pairs, rows), 1):
        for side in ("chosen", "rejected"):
            ids = row["prompt_ids"] + row[f"{side}_ids"]
            views.append({"row": number, "side": side,
                          "text": tokenizer.apply_chat_template(pair["prompt"] + pair[side], chat_template=training,
                                                                tokenize=False),
                          "ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids),
                          "mask": [0] * len(row["prompt_ids"]) + [1] * len(row[f"{side}_ids"])})
    return views


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except OSError as error:
        raise UsageError(f"cannot load the tokenizer of {model!r} ({str(error).splitlines()[0]})")


# Output -------------------------------------------------------------------------------------------------


def write(views: list[dict], as_json: bool) -> None:
    if as_json:
        for view in views:
            sys.stdout.write(json.dumps(view, ensure_ascii=False) + "\n")
        return
    dim = sys.stdout.isatty()
    for number, view in enumerate(views, 1):
        if "call" in view:
            where = f"row {view['row']}, call {view['call']} ({view['request']})"
        else:
            where = f"row {view['row']}, {view['side']}" if "side" in view else f"row {number}"
        lines = [f"--- {where}: {len(view['ids'])} tokens", tokens.unmark(view["text"]), "", "tokens:"]
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
