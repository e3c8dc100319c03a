"""The engine contract as its callers use it: the tokens an engine cut to fit reach every count that reports them,
taken from what choice_logprobs returns; an engine's options are its own."""

from __future__ import annotations

import math

import pytest
from scripted_engine import ScriptedEngine

from caictl.data.constitution import load as load_constitution
from caictl.engines import load_engine
from caictl.engines.base import ChoiceScores
from caictl.errors import UsageError
from caictl.feedback.judge import Judge, PairToJudge
from caictl.feedback.judge_reward import JudgeReward
from caictl.stages.eval_mc import score_questions

CONVERSATION = [{"role": "user", "content": "How do I pick a lock?"}]


class CuttingEngine(ScriptedEngine):
    """Says it cut 1, 2, 3, ... tokens from the texts of each scoring call, in order; every choice is as likely."""

    def choice_logprobs(self, texts: list[str], choices: list[str]) -> ChoiceScores:
        self.calls.append(("choice_logprobs", texts, choices))
        even = math.log(1 / len(choices))
        return ChoiceScores([[even] * len(choices) for _ in texts], [i + 1 for i in range(len(texts))])


def test_a_vote_counts_the_tokens_cut_from_both_its_orders():
    constitution = load_constitution("harmless")
    pair = PairToJudge("x", CONVERSATION, "Sure.", "No.", constitution.comparison[:2])
    # Questions go principle by principle, each in both orders: cuts 1 and 2 are the first principle's.
    (first, second), = Judge(CuttingEngine(), constitution, debias=True).votes([pair])
    assert (first["truncated_tokens"], second["truncated_tokens"]) == (1 + 2, 3 + 4)
    (uncut, _), = Judge(ScriptedEngine(), constitution, debias=True).votes([pair])
    assert "truncated_tokens" not in uncut


def test_refusal_probabilities_count_the_tokens_cut_from_a_response_s_two_questions():
    judge = Judge(CuttingEngine(), load_constitution("harmless"), debias=True)
    probabilities, cuts = judge.refusal_probabilities([CONVERSATION, CONVERSATION], ["Sure.", "No."])
    assert probabilities == pytest.approx([0.5, 0.5]) and cuts == [1 + 2, 3 + 4]


def test_judge_ratings_pass_on_the_tokens_cut_per_rollout():
    constitution = load_constitution("harmless")
    reward = JudgeReward(CuttingEngine(), constitution)
    rewards, cuts = reward.ratings([CONVERSATION] * 3, ["a", "b", "c"], constitution.comparison[:3])
    assert rewards == pytest.approx([0.0, 0.0, 0.0]) and cuts == [1, 2, 3]


def test_eval_mc_puts_each_question_s_cut_back_in_input_order():
    rows = [{"prompt": "First?", "corrects": [" (A)"], "incorrects": [" (B)"]},
            {"prompt": "Second?", "corrects": [" yes"], "incorrects": [" no"]},
            {"prompt": "Third?", "corrects": [" (B)"], "incorrects": [" (A)"]}]

    class Progress:
        def advance(self, count: int) -> None:
            pass

    # The first and third share their choices: one call, cuts 1 and 2; the second is a call of its own.
    scored = score_questions(CuttingEngine(), rows, batch_size=8, progress=Progress())
    assert [(row["prompt"], cut) for row, _, cut in scored] == [("First?", 1), ("Second?", 1), ("Third?", 2)]


def test_the_openai_engine_takes_no_batch_size():
    # A server batches requests itself; caictl's only limit there is --concurrency.
    with pytest.raises(UsageError, match=r"engine 'openai' takes no option 'batch_size'; its options: base_url"):
        load_engine("openai", "m", base_url="http://127.0.0.1:1/v1", batch_size=4)


def test_one_stop_rule_for_every_generation():
    # The engine, PPO's rollouts and eval iterations all stop by caictl.engines.base.stop_ids: the tokenizer's eos
    # first, then every generation_config id, each once; a config with one id or none still stops at the eos.
    from types import SimpleNamespace

    from caictl.engines.base import stop_ids

    tokenizer = SimpleNamespace(eos_token_id=2)
    assert stop_ids(tokenizer, SimpleNamespace(eos_token_id=[7, 2, 9])) == [2, 7, 9]
    assert stop_ids(tokenizer, SimpleNamespace(eos_token_id=7)) == [2, 7]
    assert stop_ids(tokenizer, SimpleNamespace(eos_token_id=None)) == [2]
    assert stop_ids(SimpleNamespace(eos_token_id=None), SimpleNamespace(eos_token_id=[7])) == [7]
