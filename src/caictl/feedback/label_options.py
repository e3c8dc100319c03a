"""The labeller's options and its reading of pairs: one source for `caictl label`, `eval labeler` and
`constitution diff`, so that all three ask the feedback model the same question with the same principle draw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from caictl import settings
from caictl.data.constitution import Constitution
from caictl.data.records import Pairs, read_rows, to_pairs
from caictl.engines import ENGINES
from caictl.engines.generation import open_engine
from caictl.errors import InputError
from caictl.feedback.judge import Comparison, Judge
from caictl.models import kind as model_kind

PAPER_COT_CLAMP = (0.4, 0.6)  # the paper's clamp for chain-of-thought labels


@dataclass(kw_only=True)
class LabelOptions:
    """How a comparison is labelled and by which model; a stage's config adds what it reads and writes."""

    model: str | None = None  # the feedback model
    engine: str = "hf"
    base_url: str | list[str] | None = None  # openai engine: server URL(s); None: CAICTL_BASE_URL, caictl.yaml
    hard: bool = False  # 0/1 labels instead of soft probabilities
    cot: bool = False  # chain-of-thought: reason first, then read the answer probabilities
    clamp: tuple[float, float] | None = None  # clamp every probability into [lo, hi]; --cot defaults to 0.4-0.6
    principles_per_pair: int = 1  # K principles per comparison, averaged (principle ensembling)
    debias: bool = True  # score both orders and average
    few_shot: bool = False  # worked labelling examples from the constitution before the question
    max_new_tokens: int = 256  # --cot reasoning length
    temperature: float = 1.0  # --cot reasoning sampling
    batch_size: int = 16  # comparisons judged (and written) at a time
    concurrency: int = 8  # openai engine: requests in flight
    compile: bool | None = None  # hf engine: decoding through torch.compile; None: with CUDA only
    max_retries: int | None = None  # openai engine; None: CAICTL_MAX_RETRIES, caictl.yaml, the engine's
    timeout: float | None = None  # openai engine, seconds a request may take; None: likewise
    seed: int = 0  # principle draw, --cot sampling

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
        return open_engine(self.engine, model, self.base_url, self.batch_size, self.concurrency, self.max_retries,
                           self.timeout, self.compile)

    def judge(self, engine, constitution: Constitution, cot: bool, debias: bool,
              clamp: tuple[float, float] | None) -> Judge:
        """The feedback model's question under `constitution`, with these options' few-shot, reasoning and seed."""
        return Judge(engine, constitution, few_shot=self.few_shot, cot=cot, debias=debias, clamp=clamp,
                     max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=self.seed)


def read_comparisons(path: str | None, constitution: Constitution, principles_per_pair: int, seed: int,
                     pairing: str = "first-two", rejects=None) -> list[Comparison]:
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
        for comparison in _comparisons_of(pairs, pairing):
            rng = random.Random(f"{seed}:{comparison.id}:principles")
            k = min(principles_per_pair, len(constitution.comparison))
            comparison.principles = rng.sample(constitution.comparison, k)
            comparison.upstream = row.data.get("meta")
            comparisons.append(comparison)
    if not comparisons:
        raise InputError(f"{path or '-'}: no pairs to label")
    return comparisons


def _comparisons_of(pairs: Pairs, pairing: str) -> list[Comparison]:
    responses, extra = pairs.responses, pairs.extra
    if pairs.human_chosen_index is not None:
        # Kept in the record, so the labels can be checked against people: chosen_index == human_chosen_index.
        extra = {**extra, "human_chosen_index": pairs.human_chosen_index}
    if pairing == "first-two" or len(responses) == 2:
        return [Comparison(pairs.id, pairs.messages, responses[0], responses[1], [], extra)]
    return [Comparison(f"{pairs.id}/{i}-{j}", pairs.messages, responses[i], responses[j], [], extra)
            for i in range(len(responses)) for j in range(i + 1, len(responses))]
