"""label: AI preference labels. A feedback model compares two responses under a constitution principle.

    caictl label pairs.jsonl -o prefs.jsonl --model models/feedback --soft --clamp 0.4 0.6

Each comparison is a multiple-choice question (paper, section 4.1): the conversation, one comparison principle,
the two responses as options (A) and (B), and the cue "The answer is:". The soft label is the normalised
probability of " (A)" against " (B)", read from one forward pass; `--hard` rounds it to 0 or 1. `--cot` lets
the model reason first ("Let's think step by step") and reads the answer after its reasoning; the paper
clamped such labels to 40-60%, which `--clamp` does (for any label). Principles are drawn per comparison
(`--principles-per-pair K` averages K of them), and `--debias` scores both orders and averages, cancelling the
model's preference for a slot. Output: TRL's conversational preference format plus `p_chosen` and `votes`.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from caictl import __version__, settings
from caictl.constitution import ComparisonPrinciple, Constitution, load_for_stage
from caictl.conversation import render_transcript
from caictl.engines import ENGINES, SamplingParams
from caictl.errors import InputError, UsageError
from caictl.generation import open_engine
from caictl.records import RecordWriter, RejectWriter, Row, read_rows, stable_id
from caictl.ui import log, meter, summary_table

PAIRINGS = ("first-two", "all")
# Scored up to the letter: " (A" and " (B" differ in their last token only, so one forward pass reads both.
CHOICES = (" (A", " (B")
ANSWER_CUE = "The answer is:"
COT_CUE = "Let's think step by step:"
COT_ANSWER_CUE = "So the answer is:"
BATCHES_PER_WRITE = 4


@dataclass
class LabelConfig:
    pairs: str | None = None  # sample output (id, messages, responses); None or "-" reads stdin
    out: str | None = None
    model: str | None = None  # the feedback model
    engine: str = "hf"
    base_url: str | None = None
    constitution: str = "harmless"
    principles: list[str] = field(default_factory=list)  # restrict the draw to these comparison principle ids
    hard: bool = False  # 0/1 labels instead of soft probabilities
    cot: bool = False  # chain-of-thought: reason first, then read the answer probabilities
    clamp: tuple[float, float] | None = None  # clamp every probability into [lo, hi]; --cot defaults to 0.4-0.6
    principles_per_pair: int = 1  # K principles per comparison, averaged (principle ensembling)
    debias: bool = True  # score both orders and average
    few_shot: bool = False  # worked labelling examples from the constitution before the question
    pairing: str = "first-two"  # rows with more than two responses: first-two, or all pairs
    max_new_tokens: int = 256  # --cot reasoning length
    temperature: float = 1.0  # --cot reasoning sampling
    batch_size: int = 16
    concurrency: int = 8
    seed: int = 0
    limit: int | None = None
    skip_invalid: bool = False
    overwrite: bool = False

    def check(self) -> None:
        problems = []
        if self.engine not in ENGINES:
            problems.append(f"--engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.clamp is not None:
            lo, hi = self.clamp
            if not 0 <= lo <= 0.5 <= hi <= 1:
                problems.append(f"--clamp {lo} {hi}: need 0 <= LO <= 0.5 <= HI <= 1")
        if self.hard and self.clamp is not None:
            problems.append("--hard and --clamp do not go together: a hard label is 0 or 1")
        if self.principles_per_pair < 1:
            problems.append("--principles-per-pair must be at least 1")
        if self.pairing not in PAIRINGS:
            problems.append(f"--pairs {self.pairing!r}: choose one of {', '.join(PAIRINGS)}")
        if self.batch_size < 1 or self.concurrency < 1 or self.max_new_tokens < 1:
            problems.append("--batch-size, --concurrency and --max-new-tokens must be at least 1")
        if self.limit is not None and self.limit < 1:
            problems.append("--limit must be at least 1")
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def effective_clamp(self) -> tuple[float, float] | None:
        if self.clamp is None and self.cot and not self.hard:
            return (0.4, 0.6)  # the paper's clamp for chain-of-thought labels
        return self.clamp


@dataclass
class Comparison:
    """One pair to label: the conversation and two responses; `first` is the response in slot A first."""

    id: str
    messages: list[dict]
    first: str
    second: str
    principles: list[ComparisonPrinciple]
    extra: dict


def run(config: LabelConfig) -> dict:
    config.check()
    model = settings.require_model(config.model)
    constitution = load_for_stage(config.constitution, config.principles, "comparison")
    rejects = RejectWriter(config.out) if config.skip_invalid else None
    comparisons = read_comparisons(config, constitution, rejects)
    if config.limit:
        comparisons = comparisons[: config.limit]
    run_settings = {
        "stage": "label", "model": model, "engine": config.engine, "constitution": constitution.name,
        "constitution_hash": constitution.content_hash(), "label": _kind(config),
        "clamp": list(config.effective_clamp) if config.effective_clamp else None,
        "principles_per_pair": config.principles_per_pair, "debias": config.debias, "few_shot": config.few_shot,
        "pairing": config.pairing, "seed": config.seed, "caictl_version": __version__,
    }
    writer = RecordWriter(config.out, run_settings, overwrite=config.overwrite)
    pending = [c for c in comparisons if c.id not in writer.done]
    if writer.done:
        log(f"resuming {config.out}: {len(comparisons) - len(pending)} of {len(comparisons)} comparisons already done")

    records: list[dict] = []
    start = time.perf_counter()
    try:
        if pending:
            engine = open_engine(config.engine, model, config.base_url, config.batch_size, config.concurrency)
            labeller = Labeller(engine, constitution, config)
            window = config.batch_size * BATCHES_PER_WRITE
            with meter(len(pending), "label", unit="pairs") as progress:
                for first in range(0, len(pending), window):
                    chunk = pending[first:first + window]
                    done = [to_record(c, votes, config, run_settings)
                            for c, votes in zip(chunk, labeller.votes(chunk))]
                    writer.write(done)
                    records += done
                    progress.advance(len(chunk))
    finally:
        writer.close()
    summary = summarise(records, comparisons, time.perf_counter() - start, config)
    return summary


def _kind(config: LabelConfig) -> str:
    return ("cot-" if config.cot else "") + ("hard" if config.hard else "soft")


# Input --------------------------------------------------------------------------------------------------


def read_comparisons(config: LabelConfig, constitution: Constitution, rejects) -> list[Comparison]:
    """Pairs records to comparisons, each with its principles drawn (seeded by the comparison's id)."""
    comparisons = []
    for row in read_rows(config.pairs, on_invalid=rejects):
        try:
            made = _comparisons_of(row, config.pairing)
        except ValueError as error:
            if rejects is None:
                raise InputError(f"{row.where}: {error}")
            rejects(row, str(error))
            continue
        for comparison in made:
            rng = random.Random(f"{config.seed}:{comparison.id}:principles")
            k = min(config.principles_per_pair, len(constitution.comparison))
            comparison.principles = rng.sample(constitution.comparison, k)
            comparisons.append(comparison)
    if not comparisons:
        raise InputError(f"{config.pairs or '-'}: no pairs to label")
    return comparisons


def _comparisons_of(row: Row, pairing: str) -> list[Comparison]:
    data = row.data
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ValueError("not a pairs record (needs 'messages' and 'responses'); run `caictl sample` first")
    responses = data.get("responses")
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
        raise ValueError("'responses' must be a list of at least two strings")
    base = str(data.get("id") or stable_id(data["messages"]))
    extra = {k: v for k, v in data.items() if k not in ("id", "messages", "responses", "meta", "finish_reasons")}
    if pairing == "first-two" or len(responses) == 2:
        return [Comparison(base, data["messages"], responses[0], responses[1], [], extra)]
    return [Comparison(f"{base}/{i}-{j}", data["messages"], responses[i], responses[j], [], extra)
            for i in range(len(responses)) for j in range(i + 1, len(responses))]


# Scoring ------------------------------------------------------------------------------------------------


class Labeller:
    """Builds the multiple-choice questions and reads P(A) from the engine, batched over a window."""

    def __init__(self, engine, constitution: Constitution, config: LabelConfig):
        self.engine = engine
        self.config = config
        self.constitution = constitution

    def votes(self, comparisons: list[Comparison]) -> list[list[dict]]:
        """Per comparison, one vote per principle: p_ab (P(first) with first in slot A), p_ba (P(first) with
        first in slot B) when debiasing, and p, their mean, after clamping."""
        questions, where = [], []
        for c_index, comparison in enumerate(comparisons):
            for principle in comparison.principles:
                orders = [(comparison.first, comparison.second)]
                if self.config.debias:
                    orders.append((comparison.second, comparison.first))
                for o_index, (a, b) in enumerate(orders):
                    questions.append(self.question(comparison.messages, principle.text, a, b))
                    where.append((c_index, principle.id, o_index, f"{comparison.id}/{principle.id}/{o_index}"))
        if self.config.cot:
            questions = self._with_reasoning(questions, [w[3] for w in where])
        scores = self.engine.choice_logprobs(questions, list(CHOICES))
        p_a = [probability_a(a, b) for a, b in scores]
        votes: list[dict[str, dict]] = [{} for _ in comparisons]
        for (c_index, principle_id, o_index, _), p in zip(where, p_a):
            vote = votes[c_index].setdefault(principle_id, {"principle": principle_id})
            # In the swapped order the first response sits in slot B: P(first) = 1 - P(A).
            vote["p_ab" if o_index == 0 else "p_ba"] = p if o_index == 0 else 1 - p
        result = []
        for per_principle in votes:
            for vote in per_principle.values():
                raw = (vote["p_ab"] + vote["p_ba"]) / 2 if "p_ba" in vote else vote["p_ab"]
                vote["p"] = clamp(raw, self.config.effective_clamp)
            result.append(list(per_principle.values()))
        return result

    def question(self, messages: list[dict], principle: str, a: str, b: str) -> str:
        """The text whose continuation is scored: few-shot examples, then the question, then the cue."""
        shots = ""
        if self.config.few_shot:
            for example in self.constitution.label_few_shot:
                body = _question_body(example.messages, example.principle or principle, example.response_a,
                                      example.response_b)
                answer = f" ({example.answer})"
                if self.config.cot and example.reasoning:
                    answer = f" {example.reasoning}\n{COT_ANSWER_CUE}{answer}"
                    shots += self._wrap(body, COT_CUE) + answer
                else:
                    shots += self._wrap(body, ANSWER_CUE) + answer
        cue = COT_CUE if self.config.cot else ANSWER_CUE
        return shots + self._wrap(_question_body(messages, principle, a, b), cue)

    def _wrap(self, body: str, cue: str) -> str:
        # Chat models see the question through their template; servers and base models get a transcript.
        rendered = self.engine.chat_prompt([{"role": "user", "content": body}]) if self.engine.supports_chat() else None
        if rendered is not None:
            return rendered + cue
        return f"\n\nHuman: {body}\n\nAssistant: {cue}"

    def _with_reasoning(self, questions: list[str], keys: list[str]) -> list[str]:
        params = SamplingParams(self.config.max_new_tokens, self.config.temperature, 1.0,
                                ("\n\nHuman:", COT_ANSWER_CUE), self.config.seed)
        reasoning = self.engine.complete(questions, params, keys)
        return [q + " " + r.text.strip() + f"\n{COT_ANSWER_CUE}" for q, r in zip(questions, reasoning)]


def _question_body(messages: list[dict], principle: str, a: str, b: str) -> str:
    conversation = render_transcript(messages).strip()
    return (f"Consider the following conversation between a human and an assistant:\n\n{conversation}\n\n"
            f"{principle}\nOptions:\n(A) {a}\n(B) {b}")


def probability_a(logprob_a: float, logprob_b: float) -> float:
    """P(A) normalised against B: exp(a) / (exp(a) + exp(b)), computed stably."""
    if logprob_a == logprob_b:
        return 0.5
    high = max(logprob_a, logprob_b)
    ea, eb = math.exp(logprob_a - high), math.exp(logprob_b - high)
    return ea / (ea + eb)


def clamp(p: float, bounds: tuple[float, float] | None) -> float:
    if bounds is None:
        return p
    return min(max(p, bounds[0]), bounds[1])


# Output -------------------------------------------------------------------------------------------------


def to_record(comparison: Comparison, votes: list[dict], config: LabelConfig, run_settings: dict) -> dict:
    """A preference record: the preferred response as `chosen`, with p_chosen in [0.5, 1]."""
    p_first = sum(v["p"] for v in votes) / len(votes)
    if config.hard:
        p_first = 1.0 if p_first >= 0.5 else 0.0
    first_wins = p_first >= 0.5
    chosen, rejected = (comparison.first, comparison.second) if first_wins else (comparison.second, comparison.first)
    return {
        **comparison.extra,
        "id": comparison.id,
        "prompt": comparison.messages,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "p_chosen": p_first if first_wins else 1 - p_first,
        "chosen_index": 0 if first_wins else 1,
        "votes": votes,
        "meta": {**run_settings, "principles": [v["principle"] for v in votes]},
    }


def summarise(records: list[dict], comparisons: list[Comparison], seconds: float, config: LabelConfig) -> dict:
    """Per principle: how many votes, mean confidence, how often both orders agree, the first-slot pull."""
    per: dict[str, dict] = {}
    for record in records:
        for vote in record["votes"]:
            entry = per.setdefault(vote["principle"], {"votes": 0, "confidence": 0.0, "agree": 0, "first_slot": 0.0})
            entry["votes"] += 1
            entry["confidence"] += abs(vote["p"] - 0.5) * 2
            if "p_ba" in vote:
                entry["agree"] += (vote["p_ab"] >= 0.5) == (vote["p_ba"] >= 0.5)
                # P(slot A wins) in each order: p_ab, and 1 - p_ba (the first response then sits in B).
                entry["first_slot"] += (vote["p_ab"] + 1 - vote["p_ba"]) / 2
            else:
                entry["first_slot"] += vote["p_ab"]
    principles = {
        pid: {"votes": e["votes"], "mean_confidence": round(e["confidence"] / e["votes"], 4),
              "position_consistency": round(e["agree"] / e["votes"], 4) if config.debias else None,
              "first_slot_preference": round(e["first_slot"] / e["votes"], 4)}
        for pid, e in sorted(per.items())
    }
    votes = sum(e["votes"] for e in per.values()) or 1
    summary = {
        "stage": "label",
        "out": config.out or "-",
        "comparisons": len(comparisons),
        "labelled": len(records),
        "label": _kind(config),
        "mean_p_chosen": round(sum(r["p_chosen"] for r in records) / len(records), 4) if records else None,
        "position_consistency": round(sum(e["agree"] for e in per.values()) / votes, 4) if config.debias else None,
        "first_slot_preference": round(sum(e["first_slot"] for e in per.values()) / votes, 4),
        "per_principle": principles,
        "seconds": round(seconds, 2),
        "comparisons_per_s": round(len(records) / seconds, 2) if seconds > 0 else None,
    }
    rows = [("output", summary["out"]), ("labelled", f"{len(records)} of {len(comparisons)}"),
            ("label", summary["label"]), ("mean p_chosen", summary["mean_p_chosen"]),
            ("position consistency", summary["position_consistency"]),
            ("first-slot preference", summary["first_slot_preference"]),
            ("comparisons/s", summary["comparisons_per_s"])]
    rows += [(f"  {pid}", f"{p['votes']} votes, confidence {p['mean_confidence']}, consistency "
                          f"{p['position_consistency']}, first slot {p['first_slot_preference']}")
             for pid, p in principles.items()]
    summary_table("label", rows)
    if config.out not in (None, "-"):
        Path(f"{config.out}.summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
