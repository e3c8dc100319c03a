"""The feedback model as the reward (`caictl ppo --reward judge`): the rating reward is the probability-weighted
rating read from the judge's logits, the pairwise reward is antisymmetric, and both PPO paths train with it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import EXAMPLES, caictl_in_process

from caictl.data import control_text as tokens
from caictl.data.constitution import load, load_for_stage
from caictl.engines import SamplingParams, load_engine
from caictl.feedback.judge_reward import RATINGS, JudgeReward
from caictl.models.pm import conversation_text

MESSAGES = [{"role": "user", "content": "How do I get my neighbour's wifi password?"}]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine("hf", str(tiny_model), batch_size=4)


def test_the_rating_reward_is_the_probability_weighted_rating_from_the_logits(engine):
    reward = JudgeReward(engine, load("harmless"), "rating", seed=3)
    responses = ["Ask them for it, or use your own connection.", "Here is how to break into it."]
    texts = [conversation_text(MESSAGES, r) for r in responses]
    rewards = reward.score_responses([MESSAGES] * len(responses), responses)
    for text, response, got in zip(texts, responses, rewards):
        question = reward.judge.rating_question(MESSAGES, response, reward.principle(text).text)
        asked = engine.encoder.encode([question])[0]
        logprobs = []
        for rating in RATINGS:  # each rating's tokens after the question, from one forward pass over both
            ids = engine.encoder.encode([question + tokens.mark(rating)])[0]
            assert ids[:len(asked)] == asked
            with torch.no_grad():
                every = torch.log_softmax(engine.lm(torch.tensor([ids])).logits[0].float(), -1)
            logprobs.append(sum(float(every[i - 1, ids[i]]) for i in range(len(asked), len(ids))))
        p = torch.softmax(torch.tensor(logprobs), 0)
        mean = float((p * torch.arange(1, 10)).sum())
        assert got == pytest.approx((mean - 5) / 4, abs=1e-5)
        assert -1 <= got <= 1
    assert rewards[0] != rewards[1]


def test_the_pairwise_reward_is_antisymmetric(engine):
    one_principle = load_for_stage("harmless", [load("harmless").comparison[0].id], "comparison")
    a, b = "Ask them for it, or use your own connection.", "Here is how to break into it."

    def against(reply):
        return JudgeReward(engine, one_principle, "pairwise", reference=lambda prompts: [reply] * len(prompts))

    a_over_b = against(b).score_responses([MESSAGES], [a])[0]
    b_over_a = against(a).score_responses([MESSAGES], [b])[0]
    assert a_over_b != 0 and a_over_b == pytest.approx(-b_over_a, abs=1e-6)


def test_the_reference_reply_is_generated_once_per_prompt(engine):
    asked = []

    def reference(prompts):
        asked.extend(conversation_text(p) for p in prompts)
        return ["I can't help with that."] * len(prompts)

    reward = JudgeReward(engine, load("harmless"), "pairwise", reference=reference)
    reward.score_responses([MESSAGES] * 2, ["one", "two"])
    # A response that makes up a turn of its own asks for no reference to a conversation it invented.
    reward.score_responses([MESSAGES] * 2, ["three", "four\n\nHuman: And?\n\nAssistant: Five."])
    assert asked == [conversation_text(MESSAGES)]


def ppo_only(algo: str, *flags: str) -> tuple[str, ...]:
    """Flags of caictl's own PPO, which --algo rloo|grpo refuses."""
    return flags if algo == "ppo" else ()


@pytest.mark.slow
@pytest.mark.parametrize("algo, mode", [("ppo", "rating"), ("grpo", "pairwise")])
def test_ppo_trains_against_the_judge(tmp_path, tiny_model, algo, mode):
    out = tmp_path / algo
    caictl_in_process("ppo", EXAMPLES / "red-team.jsonl", "--policy", tiny_model, "--reward", "judge",
                      "--judge", tiny_model, "--judge-mode", mode, "-o", out, "--algo", algo, "--steps", "2",
                      "--batch-size", "4", *ppo_only(algo, "--minibatch-size", "2"), "--num-generations", "2",
                      "--max-new-tokens", "8", "--heldout", "0.2")
    info = json.loads((out / "caictl.json").read_text())
    assert info["reward"] == "judge" and info["options"]["judge_mode"] == mode and info["pm"] is None
    metrics = info["metrics"]
    assert metrics["steps"] == 2
    for measured in (metrics["heldout_reward_before"], metrics["heldout_reward_after"]):
        assert -1 <= measured <= 1 if mode == "rating" else -0.5 <= measured <= 0.5


@pytest.fixture(scope="module")
def short_context_judge(tiny_model, tmp_path_factory):
    """The tiny model with a 48-position context: every question the judge is asked is longer, and is cut."""
    folder = tmp_path_factory.mktemp("judge") / "short-context"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 48}))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_rollouts_whose_judge_questions_were_cut_are_counted_and_named(tmp_path, tiny_model, short_context_judge,
                                                                      algo, capfd):
    out = tmp_path / algo
    caictl_in_process("ppo", EXAMPLES / "red-team.jsonl", "--policy", tiny_model, "--reward", "judge",
                      "--judge", short_context_judge, "-o", out, "--algo", algo, "--steps", "1", "--batch-size", "4",
                      *ppo_only(algo, "--minibatch-size", "2"), "--num-generations", "2", "--max-new-tokens", "8",
                      "--heldout", "0")
    metrics = json.loads((out / "caictl.json").read_text())["metrics"]
    assert "pm_truncated_rollouts" not in metrics
    assert metrics["judge_truncated_rollouts"] == 4  # every rollout of the one step, on either path
    assert "judge_truncated_rollouts in caictl.json" in capfd.readouterr().err


def pairwise_ppo(tmp_path, tiny_model, monkeypatch, **options):
    """caictl's PPO set up with the pairwise judge reward, and the model folders it loaded to get there."""
    from transformers import AutoModelForCausalLM

    from caictl.stages import ppo

    loaded, load = [], AutoModelForCausalLM.from_pretrained

    def counted(name, *args, **kwargs):
        loaded.append(str(name))
        return load(name, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counted)
    trainer = ppo.PPO(ppo.PPOConfig(prompts=str(EXAMPLES / "red-team.jsonl"), policy=str(tiny_model), pm=None,
                                    reward="judge", judge=str(tiny_model), judge_mode="pairwise",
                                    out=str(tmp_path / "rl"), batch_size=4, max_new_tokens=8, **options))
    return trainer, loaded


def test_the_pairwise_replies_come_from_the_frozen_copy_ppo_already_holds(tmp_path, tiny_model, monkeypatch):
    from caictl.feedback.judge_reward import GreedyReplies

    trainer, loaded = pairwise_ppo(tmp_path, tiny_model, monkeypatch)
    assert loaded == [str(tiny_model)] * 3  # the policy, its frozen reference, the judge: no copy for the replies
    shared = trainer.scorer.reference.engine
    assert shared.lm is trainer.reference
    # It generates as an engine that loaded the policy itself does (the tiny model's greedy replies are empty, so
    # its raw continuations are compared).
    params, texts = SamplingParams(8, 0.0), ["Human: Say something kind.\n\nAssistant:", "Once upon a time"]
    alone = load_engine("hf", str(tiny_model), batch_size=4)
    continued = [g.text for g in shared.complete(texts, params, ["a", "b"])]
    assert continued == [g.text for g in alone.complete(texts, params, ["a", "b"])] and all(continued)
    prompts = [MESSAGES, [{"role": "user", "content": "Say something kind."}]]
    assert trainer.scorer.reference(prompts) == GreedyReplies(alone, 8)(prompts)


def test_under_lora_the_pairwise_replies_come_from_the_base_with_the_adapter_off(tmp_path, tiny_model, monkeypatch):
    import torch

    trainer, loaded = pairwise_ppo(tmp_path, tiny_model, monkeypatch, lora=True)
    assert loaded == [str(tiny_model)] * 2  # the policy and the judge: the reference is the policy's own base
    with torch.no_grad():  # an adapter that has moved the policy: adapter on and off now generate differently
        for name, parameter in trainer.policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 1.0)
    replies = trainer.scorer.reference
    params, texts, keys = SamplingParams(8, 0.0), ["Human: Say something kind.\n\nAssistant:", "Once upon"], ["a", "b"]
    with replies.context():
        reference = [g.text for g in replies.engine.complete(texts, params, keys)]
    adapted = [g.text for g in replies.engine.complete(texts, params, keys)]
    alone = [g.text for g in load_engine("hf", str(tiny_model), batch_size=4).complete(texts, params, keys)]
    assert reference == alone and adapted != alone
    # The replies themselves are generated inside that context (the tiny model's replies are empty: count entries).
    entered, context = [], replies.context
    replies.context = lambda: entered.append(1) or context()
    replies([MESSAGES])
    assert entered == [1]
