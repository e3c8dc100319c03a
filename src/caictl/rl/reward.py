"""What caictl's PPO and TRL's RLOO / GRPO share: the reward (the preference model, or the feedback model as a
judge) and the held-out reward measured before and after training.

`config` here is the ppo stage's PPOConfig; these functions read only its reward and sampling fields.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from caictl.ui import log


def reward_model(config, reference=None, reference_on=contextlib.nullcontext):
    """What scores a rollout's transcript: the preference model, or (--reward judge) the feedback model.

    reference: the frozen starting policy, already loaded; the pairwise judge's reference replies come from it
    rather than from another copy of --policy's weights (None: one is loaded). reference_on: a context in which
    `reference` is that policy (a LoRA policy's base model with the adapter switched off)."""
    if config.reward == "pm":
        from caictl.models.pm import Scorer

        return Scorer(config.pm, max_length=config.pm_max_length)
    from caictl.data.constitution import load_for_stage
    from caictl.engines import load_engine
    from caictl.feedback.judge_reward import GreedyReplies, JudgeReward

    constitution = load_for_stage(config.constitution, [], "comparison")
    engine = load_engine("hf", config.judge, batch_size=config.batch_size)
    replies = None
    if config.judge_mode == "pairwise":
        replies = GreedyReplies(load_engine("hf", config.policy, batch_size=config.batch_size, lm=reference),
                                config.max_new_tokens, reference_on)
    return JudgeReward(engine, constitution, config.judge_mode, config.seed, replies)


def heldout_reward(model: str | Path, prompts: list, scorer, config, lm=None,
                   lm_on=contextlib.nullcontext) -> float | None:
    """Mean reward (PM or judge) of one response to each held-out prompt by the model folder; None without prompts.

    Both algorithms measure before and after training this way. Every response is sampled by the hf engine with
    its own seed (config.seed, prompt id), so the number depends neither on the batch size nor on the global RNG,
    and the same folder and seed give the same number whichever path asks. lm: the folder's weights already in
    memory, held as the hf engine loads the folder (bf16 on a GPU with bf16, else fp32), sampled from instead of
    another copy (caictl's PPO: the reference before training, the trained policy after); the same weights in the
    same dtype sample the same responses. lm_on: a context in which `lm` is that model (a LoRA policy's base with
    the adapter switched off)."""
    from caictl.engines import SamplingParams, load_engine

    if not prompts:
        return None
    engine = load_engine("hf", str(model), batch_size=config.batch_size, lm=lm)
    params = SamplingParams(config.max_new_tokens, config.temperature, 1.0, (), config.seed)
    with lm_on():
        responses = engine.generate([p.messages for p in prompts], params, [p.id for p in prompts])
    scores = scorer.score_responses([p.messages for p in prompts], [r.text for r in responses])
    return round(sum(scores) / len(scores), 4)


def truncated_key(config) -> str:
    """caictl.json's count of rollouts the reward read cut: to the PM's --pm-max-length, or the judge's context."""
    return "judge_truncated_rollouts" if config.reward == "judge" else "pm_truncated_rollouts"


def warn_reward_cuts(rollouts: int, config) -> None:
    if not rollouts:
        return
    if config.reward == "judge":
        log(f"warning: {rollouts} rollout(s) did not fit the context of the --judge model {config.judge}: their "
            "questions to it were cut from the front before it scored them; each step's count is "
            "judge_truncated_rollouts in caictl.json")
    else:
        log(f"warning: {rollouts} rollout(s) were longer than --pm-max-length {config.pm_max_length} and were cut "
            "from the front before the PM scored them; each step's count is pm_truncated_rollouts in caictl.json")
