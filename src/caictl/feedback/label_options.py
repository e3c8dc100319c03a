"""The labeller's options and its reading of pairs: one source for `caictl label`, `eval labeler` and
`constitution diff`, so that all three ask the feedback model the same question with the same principle draw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from caictl import settings
from caictl.data.constitution import Constitution
from caictl.data.reading import read_rows
from caictl.data.records import Pairs, to_pairs
from caictl.engines import ENGINES
from caictl.engines.generation import open_engine
from caictl.errors import InputError
from caictl.feedback.judge import Judge, PairToJudge
from caictl.models import kind as model_kind
from caictl.options import METHOD, MODEL_ENGINE, SAMPLING, common, option

PAPER_COT_CLAMP = (0.4, 0.6)  # the paper's clamp for chain-of-thought labels


@dataclass(kw_only=True)
class LabelOptions:
    """How a comparison is labelled and by which model; a stage's config adds what it reads and writes."""

    model: str | None = common("model", None, help="The feedback model: a folder or hub id (hf engine), or the "
                                                   "server's model name (openai).")
    engine: str = common("engine", "hf")
    base_url: str | list[str] | None = common("base_url", None)
    hard: bool = option(False, "Soft: normalised P(A) vs P(B). Hard: 0 or 1.", METHOD, flag="--soft/--hard",
                        invert=True)
    cot: bool = option(False, "Chain of thought: reason first, then read the answer probabilities (clamped to "
                              "0.4-0.6 unless --clamp says otherwise).", METHOD)
    clamp: tuple[float, float] | None = option(None, "Clamp each order's probability into [LO, HI] before "
                                                     "averaging, e.g. --clamp 0.4 0.6 (the paper's CoT clamp).",
                                               METHOD, metavar="LO HI")
    principles_per_pair: int = option(1, "K principles per comparison, averaged (principle ensembling).", METHOD)
    debias: bool = option(True, "Score both orders and average (position-bias control).", METHOD)
    few_shot: bool = option(False, "Show the constitution's worked labelling examples before the question.",
                            METHOD)
    max_new_tokens: int = option(256, "--cot reasoning length, in tokens.", SAMPLING, settings="stage")
    temperature: float = option(1.0, "--cot reasoning temperature.", SAMPLING, settings="stage")
    batch_size: int = option(16, "Comparisons judged (and written) at a time.", MODEL_ENGINE, settings="stage")
    concurrency: int = common("concurrency", 8)
    compile: bool | None = common("compile", None)
    max_retries: int | None = common("max_retries", None)
    timeout: float | None = common("timeout", None)
    tokenizer: str | None = common("tokenizer", None)
    seed: int = common("seed", 0, help="Random seed: the principle draw, --cot sampling.")

    def label_problems(self) -> list[str]:
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
        if self.batch_size < 1 or self.concurrency < 1 or self.max_new_tokens < 1:
            problems.append("--batch-size, --concurrency and --max-new-tokens must be at least 1")
        return problems

    @property
    def effective_clamp(self) -> tuple[float, float] | None:
        if self.clamp is None and self.cot and not self.hard:
            return PAPER_COT_CLAMP
        return self.clamp

    def feedback_model(self, engine=None) -> str:
        """The engine's model when one is given, else --model (checked to be a causal LM for the hf engine)."""
        if engine is not None:
            return engine.model
        model = settings.require_model(self.model)
        if self.engine == "hf":
            model_kind.check(model, model_kind.CAUSAL_LM, "--model")
        return model

    def open_engine(self, model: str):
        return open_engine(self, model)

    def judge(self, engine, constitution: Constitution, cot: bool, debias: bool,
              clamp: tuple[float, float] | None) -> Judge:
        """The feedback model's question under `constitution`, with these options' few-shot, reasoning and seed."""
        return Judge(engine, constitution, few_shot=self.few_shot, cot=cot, debias=debias, clamp=clamp,
                     max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=self.seed)


def read_pairs_to_judge(path: str | None, constitution: Constitution, principles_per_pair: int, seed: int,
                        pairing: str = "first-two", rejects=None) -> list[PairToJudge]:
    """Pairs rows to comparisons, each with its principles drawn (seeded by the comparison's id). rejects: set a
    bad row aside instead of failing (a RejectWriter)."""
    comparisons = []
    seen: dict[str, int] = {}
    for row in read_rows(path, on_invalid=rejects):
        try:
            pairs = to_pairs(row.data)
        except ValueError as error:
            if rejects is None:
                raise InputError(f"{row.where}: {error}")
            rejects(row, str(error))
            continue
        # Repeated conversations without ids (hh-rlhf has them) get distinct, still stable, ids.
        seen[pairs.id] = seen.get(pairs.id, 0) + 1
        if seen[pairs.id] > 1 and "id" not in row.data:
            pairs.id = f"{pairs.id}-{seen[pairs.id]}"
        for comparison in _pairs_to_judge(pairs, pairing):
            rng = random.Random(f"{seed}:{comparison.id}:principles")
            k = min(principles_per_pair, len(constitution.comparison))
            comparison.principles = rng.sample(constitution.comparison, k)
            comparison.upstream = row.data.get("meta")
            comparisons.append(comparison)
    if not comparisons:
        raise InputError(f"{path or '-'}: no pairs to label")
    return comparisons


def _pairs_to_judge(pairs: Pairs, pairing: str) -> list[PairToJudge]:
    responses, extra = pairs.responses, pairs.extra
    if pairs.human_chosen_index is not None:
        # Kept in the record, so the labels can be checked against people: chosen_index == human_chosen_index.
        extra = {**extra, "human_chosen_index": pairs.human_chosen_index}
    if pairing == "first-two" or len(responses) == 2:
        return [PairToJudge(pairs.id, pairs.messages, responses[0], responses[1], [], extra)]
    return [PairToJudge(f"{pairs.id}/{i}-{j}", pairs.messages, responses[i], responses[j], [], extra)
            for i in range(len(responses)) for j in range(i + 1, len(responses))]
