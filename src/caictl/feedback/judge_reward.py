"""The feedback model as the reward during RL (direct RLAIF, Lee et al. 2023): `caictl ppo --reward judge`.

Each rollout is scored by the feedback model from one forward pass, under a comparison principle drawn per
rollout from the constitution (seeded by the seed and the rollout's text, so a rollout's reward does not depend on
its batch):

- rating (default): the judge is asked how well the assistant's last response meets the principle, from 1 to 9
  (one digit: single-digit numbers are one token in every family caictl supports, "10" is two in Qwen); the
  reward is the probability-weighted mean rating, mapped from [1, 9] to [-1, 1].
- pairwise: P(the rollout is preferred to the frozen starting policy's greedy reply to the same prompt), asked
  as `caictl label` asks it with both orders averaged, minus 0.5. The reference reply is generated once per
  prompt and kept.

`JudgeReward` scores rollouts like a preference model's `Scorer` (score_responses, cut_tokens, cuts), so both PPO
paths use either.
"""

from __future__ import annotations

import contextlib
import math

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
    replies; called once per prompt not seen before."""

    def __init__(self, engine, constitution: Constitution, mode: str = "rating", seed: int = 0, reference=None):
        if mode not in JUDGE_MODES:
            raise ValueError(f"judge mode {mode!r}: one of {', '.join(JUDGE_MODES)}")
        if mode == "pairwise" and reference is None:
            raise ValueError("the pairwise judge reward needs the starting policy's replies")
        self.judge = Judge(engine, constitution, debias=True, seed=seed)
        self.engine, self.constitution, self.mode, self.seed = engine, constitution, mode, seed
        self.reference = reference
        self.references: dict[str, str] = {}  # prompt transcript -> the starting policy's greedy reply
        self._cut: dict[str, int] = {}  # transcript -> tokens cut from its questions, from the last score()

    def score_responses(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        """One reward per response to its conversation, taken as given rather than read back from a transcript: a
        response that writes "Human:" and "Assistant:" turns of its own is compared (pairwise) with the starting
        policy's reply to the real conversation, not to one it made up."""
        from caictl.models.pm import conversation_text

        texts = [conversation_text(p, r) for p, r in zip(prompts, responses)]
        principles = [self.principle(text) for text in texts]
        if self.mode == "rating":
            rewards, cuts = self.ratings(prompts, responses, principles)
        else:
            rewards, cuts = self.pairwise(prompts, responses, principles)
        self._cut = dict(zip(texts, cuts))
        return rewards

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

    def pairwise(self, prompts, responses, principles) -> tuple[list[float], list[int]]:
        from caictl.models.pm import conversation_text

        keys = [conversation_text(p) for p in prompts]
        new = {key: p for key, p in zip(keys, prompts) if key not in self.references}
        if new:
            self.references.update(zip(new, self.reference(list(new.values()))))
        comparisons = [PairToJudge(str(i), p, response, self.references[key], [principle])
                       for i, (p, response, key, principle) in enumerate(zip(prompts, responses, keys, principles))]
        votes = self.judge.votes(comparisons)
        return ([v[0]["p"] - 0.5 for v in votes], [v[0].get("truncated_tokens", 0) for v in votes])


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
