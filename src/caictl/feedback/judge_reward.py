"""The feedback model as the reward during RL (direct RLAIF, Lee et al. 2023): `caictl ppo --reward judge`.

Each rollout is scored by the feedback model from one forward pass, under a comparison principle drawn per
rollout from the constitution (seeded by the seed and the rollout's text, so a rollout's reward does not depend on
its batch):

- rating (default): the judge is asked how well the assistant's last response meets the principle, from 1 to 9
  (one digit: single-digit numbers are one token in every family caictl supports, "10" is two in Qwen); the
  reward is the probability-weighted mean rating, mapped from [1, 9] to [-1, 1].
- pairwise: P(the rollout is preferred to the frozen starting policy's greedy reply to the same prompt), asked
  as `caictl label` asks it with both orders averaged, minus 0.5. The reference reply is generated once per
  prompt and kept (a server keeps a bounded number, least recently used dropped first), or given per response
  (serve-pm: a request's `labels`).

`JudgeReward` scores rollouts like a preference model's `Scorer` (score_responses, cut_tokens, cuts), so both PPO
paths use either; `caictl serve-pm --reward judge` serves the same rewards over HTTP (rate(): with what a trainer
logs beside each reward).
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict

from caictl.data.constitution import Constitution
from caictl.engines import SamplingParams
from caictl.engines.base import request_seed
from caictl.engines.generation import STOP_RESPONSE, Cuts, prompt_style, respond, response_request
from caictl.feedback.judge import Judge, PairToJudge

JUDGE_MODES = ("rating", "pairwise")
RATINGS = tuple(f" {rating}" for rating in range(1, 10))


class JudgeReward:
    """One reward per transcript (prompt and response), from the feedback model on `engine`.

    reference: for pairwise, a function from prompts (lists of messages) to the frozen starting policy's greedy
    replies; called once per prompt not seen before. None: every call must give each response's reference reply
    (serve-pm's `labels`). cache: how many prompts' replies are kept, least recently used dropped first (None:
    all, as a PPO run's prompt set is finite; a server's is not)."""

    def __init__(self, engine, constitution: Constitution, mode: str = "rating", seed: int = 0, reference=None,
                 cache: int | None = None):
        if mode not in JUDGE_MODES:
            raise ValueError(f"judge mode {mode!r}: one of {', '.join(JUDGE_MODES)}")
        if cache is not None and cache < 1:
            raise ValueError(f"reference cache of {cache}: at least 1 prompt")
        self.judge = Judge(engine, constitution, debias=True, seed=seed)
        self.engine, self.constitution, self.mode, self.seed = engine, constitution, mode, seed
        self.reference, self.cache = reference, cache
        self.references: OrderedDict[str, str] = OrderedDict()  # prompt transcript -> the reference's greedy reply
        self.generated = 0  # reference replies generated, for a server's /health
        self._cut: dict[str, int] = {}  # transcript -> tokens cut from its questions, from the last score()

    def score_responses(self, prompts: list[list[dict]], responses: list[str],
                        references: list[str | None] | None = None) -> list[float]:
        """One reward per response to its conversation, taken as given rather than read back from a transcript: a
        response that writes "Human:" and "Assistant:" turns of its own is compared (pairwise) with the starting
        policy's reply to the real conversation, not to one it made up. references: pairwise, a reply to compare
        each response with, where one is given (None: the reference's greedy reply)."""
        from caictl.models.pm import conversation_text

        scored = self.rate(prompts, responses, references)
        texts = [conversation_text(p, r) for p, r in zip(prompts, responses)]
        self._cut = {text: row["truncated_tokens"] for text, row in zip(texts, scored)}
        return [row["reward"] for row in scored]

    def rate(self, prompts: list[list[dict]], responses: list[str],
             references: list[str | None] | None = None) -> list[dict]:
        """Per response: reward, principle (its id), truncated_tokens (cut from its questions), and in pairwise mode
        p_ab and p_ba, P(the response is preferred) with it in slot A and in slot B."""
        from caictl.models.pm import conversation_text

        principles = [self.principle(conversation_text(p, r)) for p, r in zip(prompts, responses)]
        if self.mode == "rating":
            rewards, cuts = self.ratings(prompts, responses, principles)
            rows = [{"reward": reward, "truncated_tokens": cut} for reward, cut in zip(rewards, cuts)]
        else:
            rows = self.pairwise(prompts, responses, principles, references or [None] * len(prompts))
        return [{**row, "principle": principle.id} for row, principle in zip(rows, principles)]

    def cut_tokens(self, texts: list[str]) -> list[int]:
        """Tokens cut to fit the judge's context from each text's questions, as the last scoring of it found."""
        return [self._cut.get(text, 0) for text in texts]

    def cuts(self) -> Cuts:
        return Cuts("judge question(s) did not fit the feedback model's context", "judge_truncated_tokens")

    def principle(self, text: str):
        """The comparison principle a rollout is judged under, drawn by a hash of the seed and its text."""
        return self.constitution.comparison[request_seed(self.seed, text) % len(self.constitution.comparison)]

    def ratings(self, prompts, responses, principles) -> tuple[list[float], list[int]]:
        questions = [self.judge.rating_question(p, r, principle.text)
                     for p, r, principle in zip(prompts, responses, principles)]
        scores = self.engine.choice_logprobs(questions, list(RATINGS))
        return [rating_reward(row) for row in scores.logprobs], scores.cuts

    def pairwise(self, prompts, responses, principles, given) -> list[dict]:
        from caictl.models.pm import conversation_text

        generated = self._reference_replies([p for p, reply in zip(prompts, given) if reply is None])
        replies = [generated[conversation_text(p)] if reply is None else reply for p, reply in zip(prompts, given)]
        comparisons = [PairToJudge(str(i), *row, [principle])
                       for i, (row, principle) in enumerate(zip(zip(prompts, responses, replies), principles))]
        votes = [v[0] for v in self.judge.votes(comparisons)]
        return [{"reward": v["p"] - 0.5, "truncated_tokens": v.get("truncated_tokens", 0), "p_ab": v["p_ab"],
                 "p_ba": v["p_ba"]} for v in votes]

    def _reference_replies(self, prompts: list[list[dict]]) -> dict[str, str]:
        """Prompt transcript -> the reference's greedy reply, for these prompts: each not in the cache generated
        (once, however often it comes), each in it marked as just used."""
        from caictl.models.pm import conversation_text

        keys = {conversation_text(p): p for p in prompts}
        if keys and self.reference is None:
            raise ValueError("the pairwise judge reward needs a reply to compare each response with: no reference "
                             "model, and none given")
        replies = {key: self.references[key] for key in keys if key in self.references}
        new = {key: p for key, p in keys.items() if key not in replies}
        if new:
            replies.update(zip(new, self.reference(list(new.values()))))
            self.generated += len(new)
        # Kept only after use: a batch with more new prompts than the cache holds still gets all its replies.
        for key in keys:
            self.references[key] = replies[key]
            self.references.move_to_end(key)
        while self.cache is not None and len(self.references) > self.cache:
            self.references.popitem(last=False)
        return replies


def rating_reward(logprobs: list[float]) -> float:
    """The probability-weighted mean of ratings 1..9 from their log-probs, mapped to [-1, 1] (5 is 0)."""
    high = max(logprobs)
    weights = [math.exp(value - high) for value in logprobs]
    mean = sum((rating + 1) * w for rating, w in enumerate(weights)) / sum(weights)
    return (mean - 5) / 4


class GreedyReplies:
    """The reference for pairwise rewards: called with prompts, the engine's greedy reply to each. context: what
    the engine's model must be inside to be the reference (a LoRA policy with its adapter switched off)."""

    def __init__(self, engine, max_new_tokens: int, context=contextlib.nullcontext):
        self.engine, self.context = engine, context
        self.style = prompt_style("auto", engine)  # a base model continues the transcript
        self.params = SamplingParams(max_new_tokens, 0.0, stop=STOP_RESPONSE)

    def __call__(self, prompts: list[list[dict]]) -> list[str]:
        requests = [response_request(self.style, p) for p in prompts]
        keys = [str(i) for i in range(len(prompts))]
        with self.context():
            return [g.text.strip() for g in respond(self.engine, self.style, requests, self.params, keys)]
