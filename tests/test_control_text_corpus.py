"""One adversarial corpus through every in-process path, on the three real families: revise, sample, label, sft,
score and eval mc, each run once per family through its stage's run(), every corpus string in one input file.

The corpus (tests/data/control_text_corpus.json) holds control tokens of several families, whole, spaced, glued
and mixed, and look-alikes that are no control token at all (full-width, a zero-width space inside, escaped).
caictl's rule: message content is data, only the chat template's own markup becomes control tokens
(caictl.data.control_text). Each check reads the ids where the model receives them and compares them with ids
worked out here apart from caictl (Reference): the family's own tokenizer, in which each control token of the
markup is swapped for a stand-in that is an added token, and content has no control token to match. So content
must be the ids of its text, in context, with no control id of the family in it, and decode back to exactly itself.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import read_jsonl, write_jsonl

from caictl.data.control_text import unmark

CORPUS = json.loads((Path(__file__).parent / "data" / "control_text_corpus.json").read_text(encoding="utf-8"))
FAMILIES = ("qwen2.5", "llama3", "phi3")
NAMES = {case["text"]: case["name"] for case in CORPUS}
# caictl's own marks (U+FDD0, U+FDD1: Unicode noncharacters, never for interchange) are dropped from content on
# the way to every model, so that content cannot forge a mark. Requests holding them are checked apart (the last
# test); shared content (the constitution, eval mc's list of choices, sft's conversations) holds only the others.
OWN_MARKS = "\ufdd0\ufdd1"
DROPPED = {case["name"] for case in CORPUS if any(mark in case["text"] for mark in OWN_MARKS)}
KEPT = [case["text"] for case in CORPUS if case["name"] not in DROPPED]
JOINED = "\n".join(KEPT)
TOKENS = 2  # new tokens per generation: the prompts are what is checked
# Phi-3's markup tokens take in the whitespace beside them (rstrip) and its decoder turns each "▁" into a space, so
# its decoded text is compared without whitespace; Qwen2.5 and Llama 3 decode to exactly the text.
EXACT_DECODE = {"qwen2.5": True, "llama3": True, "phi3": False}
PATHS = ("revise", "sample", "label", "sft", "score", "eval-mc")


# Inputs: every corpus string in one file per stage -------------------------------------------------------------


def conversation(text: str) -> list[dict]:
    """The string as a system prompt and a user prompt, then split across two messages: its middle, which cuts a
    control token in two, falls between an assistant turn and the next user turn."""
    half = len(text) // 2
    return [{"role": "system", "content": text}, {"role": "user", "content": text},
            {"role": "assistant", "content": text[:half]}, {"role": "user", "content": text[half:]}]


def exchange(texts: list[str]) -> list[dict]:
    """Each string a message of its own, user and assistant by turns."""
    return [{"role": ("user", "assistant")[k % 2], "content": text} for k, text in enumerate(texts)]


def case_id(k: int) -> str:
    return f"[case {k:02d}]"


# The constitution holds the corpus in its critique request and in a few-shot exchange (a string per message).
CONSTITUTION = {
    "name": "control-text-corpus",
    "critique_revision": [{"id": "corpus", "critique_request": JOINED, "revision_request": "Rewrite it."}],
    "few_shot": [{"messages": exchange(KEPT + ["Fine."] * (len(KEPT) % 2)),  # ends on the answer critiqued
                  "critique_request": "What is wrong with it?", "critique": "Nothing.",
                  "revision_request": "Rewrite it.", "revision": "Done."}],
}


def sft_chats() -> list[tuple[str, list[dict]]]:
    """(what it holds, conversation): a few long conversations, each string a message of its own, once a user's and
    once an assistant's (the trained part); the strings caictl changes today (DROPPED) in conversations of their own."""
    chats = []
    for start in range(0, len(KEPT), 10):
        texts = KEPT[start:start + 10] + ["Fine."] * (len(KEPT[start:start + 10]) % 2)
        for turns in (texts, texts[1:] + texts[:1]):  # turned by one, each string changes role
            chats.append((", ".join(NAMES.get(t, t) for t in turns),
                          [{"role": "system", "content": turns[0]}] + exchange(turns)))
    return chats + [(case["name"], exchange([case["text"]] * 2)) for case in CORPUS if case["name"] in DROPPED]


SFT_CHATS = sft_chats()
# label and score: two responses to each conversation; the first names its case, so that a judge's question is
# traced to the pair it asks about.
PAIRS = [{"id": f"c{k:02d}", "messages": conversation(case["text"]),
          "responses": [f"{case_id(k)} {case['text']}", case["text"]]} for k, case in enumerate(CORPUS)]
MC_ROWS = [{"prompt": case["text"], "corrects": [" (A)"], "incorrects": [" (B)"]} for case in CORPUS] + [
    {"prompt": "Which one?", "corrects": [" " + KEPT[0]], "incorrects": [" " + t for t in KEPT[1:]]}]


def write_inputs(folder: Path) -> dict[str, Path]:
    assert all(set(case) == {"name", "text"} and case["text"].strip() for case in CORPUS), "corpus: {name, text}"
    assert len(NAMES) == len(CORPUS) == len({case["name"] for case in CORPUS}), "corpus: names and texts unique"
    prompts = [{"id": f"c{k:02d}", "messages": conversation(case["text"])} for k, case in enumerate(CORPUS)]
    (folder / "constitution.json").write_text(json.dumps(CONSTITUTION, ensure_ascii=False), encoding="utf-8")
    return {"prompts": write_jsonl(folder / "prompts.jsonl", prompts),
            "pairs": write_jsonl(folder / "pairs.jsonl", PAIRS),
            "chats": write_jsonl(folder / "chats.jsonl", [{"messages": chat} for _, chat in SFT_CHATS]),
            "mc": write_jsonl(folder / "mc.jsonl", MC_ROWS), "constitution": folder / "constitution.json"}


# What the model receives -----------------------------------------------------------------------------------


@dataclass
class Seen:
    """One stage run: the requests its engine got, and the rows of ids its model received (padding dropped)."""

    rows: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)  # sft: each row's labels (-100: no loss)
    chats: list[list[dict]] = field(default_factory=list)  # HFEngine.generate's chats
    rendered: dict[str, list[dict]] = field(default_factory=dict)  # HFEngine.chat_prompt: its text -> its chat
    scored: list[tuple[list[str], list[str]]] = field(default_factory=list)  # choice_logprobs' (texts, choices)


def watch_engine(mp, seen: Seen) -> None:
    """Records the hf engine's requests and, from SharedPrefixes.prefilled, the ids of every row it feeds the model:
    generate() and the scoring pass both take their input_ids and attention mask from there."""
    from caictl.engines import hf, prefixes

    prefilled, generate = prefixes.SharedPrefixes.prefilled, hf.HFEngine.generate
    chat_prompt, choice_logprobs = hf.HFEngine.chat_prompt, hf.HFEngine.choice_logprobs

    def on_prefilled(self, rows, *args, **kwargs):
        out = prefilled(self, rows, *args, **kwargs)
        record(seen, out[0][:len(rows)], out[1][:len(rows)])  # the rows after them are filler
        return out

    def on_generate(self, chats, *args, **kwargs):
        seen.chats += [list(chat) for chat in chats]
        return generate(self, chats, *args, **kwargs)

    def on_chat_prompt(self, chat, *args, **kwargs):
        text = chat_prompt(self, chat, *args, **kwargs)
        seen.rendered[text] = list(chat)
        return text

    def on_choice_logprobs(self, texts, choices, *args, **kwargs):
        seen.scored.append((list(texts), list(choices)))
        return choice_logprobs(self, texts, choices, *args, **kwargs)

    mp.setattr(prefixes.SharedPrefixes, "prefilled", on_prefilled)
    mp.setattr(hf.HFEngine, "generate", on_generate)
    mp.setattr(hf.HFEngine, "chat_prompt", on_chat_prompt)
    mp.setattr(hf.HFEngine, "choice_logprobs", on_choice_logprobs)


def watch_pm(mp, seen: Seen) -> None:
    """Records the input_ids of every forward call of the preference model the Scorer loads."""
    from transformers import AutoModelForSequenceClassification

    load = AutoModelForSequenceClassification.from_pretrained

    def loading(*args, **kwargs):
        model = load(*args, **kwargs)
        forward = model.forward

        def spy(*f_args, **f_kwargs):
            record(seen, f_kwargs.get("input_ids", f_args[0] if f_args else None), f_kwargs.get("attention_mask"))
            return forward(*f_args, **f_kwargs)

        model.forward = spy
        return model

    mp.setattr(AutoModelForSequenceClassification, "from_pretrained", loading)


def watch_training(mp, seen: Seen) -> None:
    """Records the batches sft's trainer feeds its model, labels included: read where the trainer hands a batch to
    the model, as TRL swaps the model's forward for its own."""
    from trl import SFTTrainer

    compute_loss = SFTTrainer.compute_loss

    def on_compute_loss(self, model, inputs, *args, **kwargs):
        record(seen, inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels"))
        return compute_loss(self, model, inputs, *args, **kwargs)

    mp.setattr(SFTTrainer, "compute_loss", on_compute_loss)


def record(seen: Seen, ids, mask, labels=None) -> None:
    for r, row in enumerate(ids.tolist()):
        keep = mask[r].tolist() if mask is not None else [1] * len(row)
        seen.rows.append([t for t, k in zip(row, keep) if k])
        if labels is not None:
            seen.labels.append([t for t, k in zip(labels[r].tolist(), keep) if k])


def run_stage(path: str, model: Path, engine, pm: Path | None, inputs: dict[str, Path], folder: Path) -> Seen:
    """The stage's run(Config(...)), as the command line calls it, with what its model receives recorded. revise,
    sample and label take the family's engine (their `engine` argument); eval mc opens its own."""
    from caictl.stages import eval_mc, label, revise, sample, score, sft

    seen, size = Seen(), len(MC_ROWS)
    with pytest.MonkeyPatch.context() as mp:
        if path == "sft":
            watch_training(mp, seen)
            # One step over every conversation (a forward pass each, as the CPU micro-batch is one row).
            sft.run(sft.SFTConfig(revisions=[str(inputs["chats"])], out=str(folder / "sft"), model=str(model),
                                  max_steps=1, batch_size=len(SFT_CHATS)))
        elif path == "score":
            watch_pm(mp, seen)
            score.run(score.ScoreConfig(pm=str(pm), file=str(inputs["pairs"]), out=str(folder / "scored.jsonl"),
                                        batch_size=size))
            assert len(read_jsonl(folder / "scored.jsonl")) == len(CORPUS)
        else:
            watch_engine(mp, seen)
            if path == "revise":
                revise.run(revise.ReviseConfig(
                    prompts=str(inputs["prompts"]), out=str(folder / "revisions.jsonl"), rounds=1,
                    constitution=str(inputs["constitution"]), temperature=0.0, max_new_tokens=TOKENS,
                    batch_size=size), engine=engine)
                assert len(read_jsonl(folder / "revisions.jsonl")) == len(CORPUS)
                # The corpus was asked in the critique request and shown in the few-shot exchange.
                shot = CONSTITUTION["few_shot"][0]["messages"]
                assert any({"role": "user", "content": JOINED} in chat for chat in seen.chats)
                assert any(chat[1:1 + len(shot)] == shot for chat in seen.chats)  # after the system prompt
            elif path == "sample":
                sample.run(sample.SampleConfig(prompts=str(inputs["prompts"]), out=str(folder / "pairs.jsonl"), n=1,
                                               temperature=0.0, max_new_tokens=TOKENS, batch_size=size),
                           engine=engine)
                assert len(read_jsonl(folder / "pairs.jsonl")) == len(CORPUS)
            elif path == "label":
                label.run(label.LabelConfig(pairs=str(inputs["pairs"]), out=str(folder / "prefs.jsonl"),
                                            batch_size=size), engine=engine)
                assert len(read_jsonl(folder / "prefs.jsonl")) == len(CORPUS)
            else:
                eval_mc.run(eval_mc.EvalMCConfig(files=[str(inputs["mc"])], out=str(folder / "eval-mc"),
                                                 model=str(model), batch_size=size))
    assert seen.rows, f"{path}: the model received nothing"
    return seen


@pytest.fixture(scope="module")
def runs(family_model, tmp_path_factory):
    """runs(path, family) -> (Seen, Reference): each stage run once per family for the module, one hf engine per
    family shared by the stages that take one."""
    from caictl.engines import load_engine
    from caictl.stages import init_model

    inputs = write_inputs(tmp_path_factory.mktemp("corpus"))
    done, engines, references = {}, {}, {}

    def _run(path: str, name: str):
        if (path, name) not in done:
            model = family_model(name)
            if name not in engines:
                engines[name] = load_engine("hf", str(model), batch_size=len(MC_ROWS))
                references[name] = Reference(engines[name].tokenizer)
            pm = None
            if path == "score":  # a scalar-head model of the family: its tokenizer is the family's
                pm = init_model.run(init_model.InitModelConfig(out=tmp_path_factory.mktemp("pm") / name,
                                                               preset="tiny", task="seq-cls", family=name))
            seen = run_stage(path, model, engines[name], pm, inputs, tmp_path_factory.mktemp(f"{path}-{name}"))
            done[(path, name)] = (seen, references[name])
        return done[(path, name)]

    return _run


# The ids content should have, worked out apart from caictl ---------------------------------------------------


@dataclass
class Expected:
    case: str  # the corpus entry a request is about, or the entries it holds
    ids: list[int]
    content: list[str]  # the content it holds, as the model should read it
    roles: list[str | None]  # per token: the role of the message whose content it is part of; None: markup
    heads: bool = False  # the model may get ids[:-1] (eval mc and the judge read a last token off the final position)


class Reference:
    """A family's tokenizer in which content holds no control token: each control token (every special added token;
    the families' stop ids are among them) is renamed to a private-use character, and the markup's control tokens are
    written as those characters before encoding. Whatever the tokenizer does around an added token (split the text
    there, take in the whitespace beside it, prepend "▁" to the next piece) it still does around a stand-in, while
    the same characters in content are plain text, encoded in context with what surrounds them."""

    def __init__(self, tokenizer):
        from tokenizers import AddedToken, Tokenizer

        self.tokenizer = tokenizer
        self.control = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.control_ids = set(self.control.values())
        backend = tokenizer.backend_tokenizer
        self.copy = Tokenizer(backend.model)  # the same vocabulary and merges (shared, not copied), no added token
        for part in ("normalizer", "pre_tokenizer"):
            if getattr(backend, part) is not None:
                setattr(self.copy, part, getattr(backend, part))
        self.stand_in, self.back = {}, {}  # control token -> its stand-in; the copy's id -> the family's id
        for k, (token_id, token) in enumerate(sorted(backend.get_added_tokens_decoder().items())):
            content = chr(0xF0000 + k) if token.content in self.control else token.content
            self.copy.add_tokens([AddedToken(content, single_word=token.single_word, lstrip=token.lstrip,
                                             rstrip=token.rstrip, normalized=token.normalized, special=token.special)])
            self.back[self.copy.token_to_id(content)] = token_id
            if content != token.content:
                self.stand_in[token.content] = content
        self.markup_ids = {self.copy.token_to_id(char) for char in self.stand_in.values()}
        self.markup = re.compile("|".join(map(re.escape, sorted(self.control, key=len, reverse=True))))
        bos = tokenizer.bos_token_id
        self.bos = bos if bos is not None and tokenizer("a").input_ids[:1] == [bos] else None

    def expect(self, case: str, pieces: list[tuple[str, str | None]], heads: bool = False,
               drop: str = "") -> Expected:
        """The ids of (text, role) pieces (role None: markup, else the role of the message whose content it is),
        after the BOS the tokenizer puts before a text that does not start with one. drop: characters taken out of
        content first."""
        text, spans = "", []
        for piece, role in pieces:
            if role is None:
                text += self.markup.sub(lambda m: self.stand_in[m.group(0)], piece)
            else:
                piece = piece.translate({ord(c): None for c in drop})
                spans.append((len(text), len(text) + len(piece), role))
                text += piece
        encoding = self.copy.encode(text, add_special_tokens=False)
        ids = [self.back.get(i, i) for i in encoding.ids]
        roles = [None if i in self.markup_ids else next((r for s, e, r in spans if s < end and start < e), None)
                 for i, (start, end) in zip(encoding.ids, encoding.offsets)]
        if self.bos is not None and ids[:1] != [self.bos]:
            ids, roles = [self.bos] + ids, [None] + roles
        leaked = [i for i, role in zip(ids, roles) if role and i in self.control_ids]
        assert not leaked, f"the reference itself reads content as control tokens: {leaked}"
        content = [piece.translate({ord(c): None for c in drop}) for piece, role in pieces if role]
        return Expected(case, ids, content, roles, heads)


def chat_pieces(tokenizer, chat: list[dict], **options) -> list[tuple[str, str | None]]:
    """The chat as its template renders it, as (markup, None) and (a message's content, its role) pieces: found by
    rendering each content as a placeholder. A template that trims content (Llama 3's) gets it trimmed."""
    holders = [f"\ue000{k}\ue001" for k in range(len(chat))]
    skeleton = tokenizer.apply_chat_template([{**m, "content": h} for m, h in zip(chat, holders)], tokenize=False,
                                             **options)
    whole = tokenizer.apply_chat_template(chat, tokenize=False, **options)
    for trim in (False, True):
        pieces, rest = [], skeleton
        for message, holder in zip(chat, holders):
            before, found, after = rest.partition(holder)
            if found:
                content = message["content"].strip() if trim else message["content"]
                pieces += [(before, None), (content, message["role"])]
                rest = after
        pieces.append((rest, None))
        if "".join(p for p, _ in pieces) == whole:
            return pieces
    raise AssertionError(f"cannot find the content in the template's rendering of {chat}")


def case_of(texts: list[str]) -> str:
    """The corpus entry a request was made for: its system prompt, or the case tag its judge question holds."""
    for text in texts:
        if text in NAMES:
            return NAMES[text]
        if tag := re.search(r"\[case (\d\d)\]", text):
            return CORPUS[int(tag.group(1))]["name"]
    return "shared"


def expected_ids(path: str, seen: Seen, ref: Reference, drop: str = "") -> list[Expected]:
    """Per request the stage made, the ids its model should receive."""
    from caictl.models.chat_training import training_template

    tokenizer = ref.tokenizer
    if path in ("revise", "sample"):
        return [ref.expect(case_of([chat[0]["content"]]), chat_pieces(tokenizer, chat, add_generation_prompt=True),
                           drop=drop) for chat in seen.chats]
    if path == "label":
        out = []
        for texts, choices in seen.scored:
            for text in texts:
                rendered = max((r for r in seen.rendered if text.startswith(r)), key=len)
                # The question is content (the conversation and both responses, as a transcript); the answer cue
                # after the template's open assistant turn, and the choices, are caictl's. The question is built by
                # caictl, so the pair's own string is checked too: it must decode back from the ids as written.
                chat = [{**m, "content": unmark(m["content"])} for m in seen.rendered[rendered]]
                pieces = chat_pieces(tokenizer, chat, add_generation_prompt=True)
                case = case_of([m["content"] for m in chat])
                for choice in choices:
                    out.append(ref.expect(case, pieces + [(unmark(text[len(rendered):]) + choice, None)], heads=True,
                                          drop=drop))
                    out[-1].content += [c["text"].translate(dict.fromkeys(map(ord, drop)))
                                        for c in CORPUS if c["name"] == case]
        return out
    if path == "sft":
        template, _ = training_template(tokenizer, "", None)
        return [ref.expect(case, chat_pieces(tokenizer, chat, chat_template=template), drop=drop)
                for case, chat in SFT_CHATS]
    if path == "score":
        # The PM reads the whole conversation as a transcript: all of it is content.
        return [ref.expect(case_of([pair["messages"][0]["content"]]), [(transcript(pair["messages"], r), "user")],
                           drop=drop) for pair in PAIRS for r in pair["responses"]]
    # eval mc: the question and each choice are content.
    return [ref.expect(NAMES.get(row["prompt"], "shared"), [(row["prompt"] + choice, "user")], heads=True, drop=drop)
            for row in MC_ROWS for choice in row["corrects"] + row["incorrects"]]


def transcript(messages: list[dict], response: str) -> str:
    """Anthropic's transcript form, written out here: a system prompt first, then Human: / Assistant: turns."""
    names = {"user": "Human", "assistant": "Assistant"}
    text = "".join(m["content"] if m["role"] == "system" else f"\n\n{names[m['role']]}: {m['content']}"
                   for m in messages)
    return text + f"\n\nAssistant: {response}"


# Checks --------------------------------------------------------------------------------------------------------


@dataclass
class Findings:
    leaks: list[str] = field(default_factory=list)  # control ids where the text's ids should be
    changed: list[str] = field(default_factory=list)  # other ids than the text's
    unexplained: list[str] = field(default_factory=list)  # rows that no request accounts for


def compare(name: str, ref: Reference, expected: list[Expected], received: list[list[int]],
            also: list[Expected] = ()) -> Findings:
    """Each request's ids against the rows the model received: one must be its ids (or, where the last token is
    read off the final position, its ids but the last). `also`: requests whose rows are accounted for, unchecked."""
    tokenizer, found = ref.tokenizer, Findings()
    rows = {tuple(r) for r in received}
    explained, missed = {c for e in also for c in (tuple(e.ids), tuple(e.ids[:-1]))}, []
    for e in expected:
        hit = next((c for c in [tuple(e.ids)] + ([tuple(e.ids[:-1])] if e.heads else []) if c in rows), None)
        if hit is None:
            missed.append(e)
            continue
        explained.add(hit)
        decoded = _squash(tokenizer.decode(list(hit), clean_up_tokenization_spaces=False), name)
        lost = [c for c in e.content if _squash(c, name) not in decoded]
        if lost:
            found.changed.append(f"{e.case}: {lost[0]!r} does not decode back from the ids the model received")
    unexplained = [list(r) for r in rows - explained]
    found.unexplained = [str(tokenizer.convert_ids_to_tokens(r)[:12]) for r in unexplained]
    # Each missed request is told against the row that reads most like it: the one that decodes to its text (a
    # control token decodes to its text too), else the one sharing most tokens with it.
    candidates = unexplained or received
    texts = {_squash(tokenizer.decode(r, clean_up_tokenization_spaces=False), name): r for r in candidates}
    for e in missed:
        row = texts.get(_squash(tokenizer.decode(e.ids, clean_up_tokenization_spaces=False), name)) \
            or _closest(candidates, e.ids)
        extra = Counter(i for i in row if i in ref.control_ids) - Counter(i for i in e.ids if i in ref.control_ids)
        at = _common_prefix(row, e.ids)
        where = (f"from token {at} the text's ids are {tokenizer.convert_ids_to_tokens(e.ids[at:at + 8])}, the "
                 f"most similar row the model got has {tokenizer.convert_ids_to_tokens(row[at:at + 8])}")
        if extra:
            found.leaks.append(f"{e.case}: content became {sorted(tokenizer.convert_ids_to_tokens(list(extra)))} "
                               f"({where})")
        else:
            found.changed.append(f"{e.case}: {where}")
    return found


def _closest(rows: list[list[int]], ids: list[int]) -> list[int]:
    """The row most like `ids` by the tokens they share, counted in any order."""
    wanted = Counter(ids)
    return max(rows, key=lambda r: (sum((Counter(r) & wanted).values()) / max(len(r), len(ids)),
                                    _common_prefix(r, ids)))


def _squash(text: str, name: str) -> str:
    return text if EXACT_DECODE[name] else "".join(text.split())


def _common_prefix(a, b) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def findings(runs, path: str, name: str, dropped: bool) -> Findings:
    """The requests about the DROPPED strings (dropped=True: expected without caictl's marks) or about the others,
    checked."""
    seen, ref = runs(path, name)
    ours = [e for e in expected_ids(path, seen, ref, drop=OWN_MARKS if dropped else "")
            if (e.case in DROPPED) == dropped]
    assert ours, f"{path} on {name}: no request to check"
    # The other requests' rows, as caictl makes them today, are accounted for.
    others = [e for e in expected_ids(path, seen, ref, drop=OWN_MARKS) if (e.case in DROPPED) != dropped]
    return compare(name, ref, ours, seen.rows, others)


# Tests ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("path", PATHS)
def test_content_reaches_the_model_as_its_text(path, name, runs):
    result = findings(runs, path, name, dropped=False)
    # No control id of the family inside content...
    assert result.leaks == [], f"{path} on {name}: control ids inside content"
    # ... and content is the ids of its text, decoding back to exactly that text.
    assert result.changed == [], f"{path} on {name}: content is not the ids of its text"
    assert result.unexplained == [], f"{path} on {name}: the model received rows no request accounts for"


@pytest.mark.parametrize("name", FAMILIES)
def test_sft_trains_on_each_answers_text_and_its_end_of_turn_only(name, runs):
    seen, ref = runs("sft", name)
    trained_rows = {tuple(row): labels for row, labels in zip(seen.rows, seen.labels)}
    for e in expected_ids("sft", seen, ref):
        if e.case in DROPPED:
            continue
        labels = trained_rows.get(tuple(e.ids))
        assert labels is not None, f"sft on {name}: {e.case}: no training row is its text's ids"
        trained = [k for k, label in enumerate(labels) if label != -100]
        assert all(labels[k] == e.ids[k] for k in trained), f"sft on {name}: {e.case}: labels are not the ids"
        # Nothing of a system or user message is trained; all of every answer is.
        prompt = [k for k in trained if e.roles[k] in ("system", "user")]
        assert prompt == [], f"sft on {name}: {e.case}: prompt tokens trained: {_tokens(ref, e.ids, prompt)}"
        answers = [k for k, role in enumerate(e.roles) if role == "assistant"]
        untrained = [k for k in answers if k not in trained]
        assert untrained == [], f"sft on {name}: {e.case}: answer tokens untrained: {_tokens(ref, e.ids, untrained)}"
        # The only control tokens trained are the end-of-turn token that closes each answer.
        closing = [next(k for k in range(end, len(e.ids)) if e.roles[k] is None and e.ids[k] in ref.control_ids)
                   for end in (k + 1 for k in answers if k + 1 == len(e.ids) or e.roles[k + 1] != "assistant")]
        control = [k for k in trained if e.ids[k] in ref.control_ids]
        assert control == closing, f"sft on {name}: {e.case}: trained control tokens {_tokens(ref, e.ids, control)}"


def _tokens(ref: Reference, ids: list[int], positions: list[int]) -> list[str]:
    return ref.tokenizer.convert_ids_to_tokens([ids[k] for k in positions])


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("path", PATHS)
def test_caictls_own_marks_are_dropped_from_content_and_nothing_else(path, name, runs):
    result = findings(runs, path, name, dropped=True)
    assert result.leaks == [], f"{path} on {name}: control ids inside content"
    assert result.changed == [], f"{path} on {name}: content is not the ids of its text"
