r"""ppo: reinforcement learning of the policy against the preference model, with a KL penalty.

    caictl ppo examples/red-team.jsonl --policy models/sl-cai --pm models/pm \
        -o models/rl-cai

`--algo ppo` (the default) runs caictl's own compact PPO (caictl.rl.ppo: Schulman et al. 2017, as used for RLHF
by Ziegler et al. 2019 and the paper): rollouts sampled in-process, the PM's score of prompt + response as the
reward (the PM re-tokenises the text with its own tokenizer), a per-token KL penalty to the frozen starting
policy (fixed `--kl-coef`, or adapted towards `--target-kl`), GAE, clipped policy ratio and value loss, several
minibatch epochs per rollout batch, a value head on the policy's own trunk. It runs in one process and refuses
to start under several.
`--algo rloo|grpo` runs the same job through TRL's RLOOTrainer / GRPOTrainer (caictl.rl.trl), with the PM as the
reward function, for users who prefer those and for several processes: `torchrun --nproc_per_node N -m caictl
ppo --algo grpo ...` or `accelerate launch --num_processes N -m caictl ppo --algo grpo ...`, --batch-size the
whole step's completions, each process generating an equal share. PPO's own options (--gamma, --lam, the clip
ranges, ...) are refused there.
`--reward judge --judge MODEL` scores rollouts with the feedback model instead of a PM, on either path
(caictl.feedback.judge_reward: a 1-9 rating, or pairwise against the starting policy's greedy reply).
Both paths measure the held-out reward with one function (caictl.rl.reward.heldout_reward), and this module
writes caictl.json and the summary for both.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import Field, dataclass, fields
from pathlib import Path

from caictl.data.reading import read_prompts
from caictl.errors import UsageError
from caictl.feedback.judge_reward import JUDGE_MODES
from caictl.models import kind as model_kind
from caictl.models.processes import is_main, world_size
from caictl.models.training import (
    batch_split_problem,
    output_folder,
    precision,
    precision_problem,
    pure_bf16_option,
    write_model_info,
)
from caictl.options import (
    INPUT_OUTPUT,
    LORA,
    METHOD,
    MODEL_ENGINE,
    RUNS,
    SAMPLING,
    TRAINING,
    common,
    declaration,
    option,
)
from caictl.rl.ppo import PPO, checkpoint_folder
from caictl.rl.reward import truncated_key, warn_reward_cuts
from caictl.rl.trl import run_trl
from caictl.ui import summary_table

ALGOS = ("ppo", "rloo", "grpo")
REWARDS = ("pm", "judge")
# Options caictl's PPO reads and TRL's RLOO / GRPO path does not: given under --algo rloo|grpo, they are refused
# rather than silently ignored.
PPO_ONLY = ("minibatch_size", "ppo_epochs", "target_kl", "max_kl", "gamma", "lam", "clip_range", "clip_range_value",
            "value_coef", "whiten_advantages", "normalise_rewards", "reward_clip", "missing_eos_penalty",
            "sample_every")


@dataclass
class PPOConfig:
    prompts: str | None = option(
        help="Prompt file (JSONL/JSON/.gz, as revise and sample read); omit or '-' to read stdin.",
        panel=INPUT_OUTPUT, argument=True)
    policy: str = option(help="The starting policy folder (caictl sft output, the SL-CAI model).", panel=MODEL_ENGINE)
    pm: str | None = option(
        help="The preference model folder (caictl train-pm output); needed with --reward pm.", panel=MODEL_ENGINE)
    out: str = option(help="Output policy folder.", panel=INPUT_OUTPUT, short="-o")
    reward: str = option(
        "pm", "pm: the preference model scores rollouts; judge: the feedback model does, from one forward pass "
        "(direct RLAIF).", METHOD)
    judge: str | None = option(
        None, "--reward judge: the feedback model (a causal LM folder or hub id).", MODEL_ENGINE)
    judge_mode: str = option(
        "rating", "--reward judge: rating (1-9, probability-weighted, mapped to [-1, 1]) or pairwise "
        "(P(preferred to the starting policy's greedy reply) - 0.5).", METHOD)
    constitution: str = option(
        "harmless", "--reward judge: the comparison principles rollouts are judged under, one drawn per rollout.",
        METHOD)
    algo: str = option(
        "ppo", "ppo (caictl's own, one process), or rloo / grpo (TRL's trainers, also several processes).", METHOD)
    num_generations: int = option(4, "rloo/grpo: responses per prompt, compared with each other.", METHOD)
    steps: int = option(50, "PPO iterations (rollout batches).", TRAINING)
    batch_size: int = option(
        16, "Rollouts per iteration, over all processes (rloo/grpo under torchrun / accelerate launch).", TRAINING)
    minibatch_size: int = option(8, "Rollouts per gradient step.", TRAINING)
    ppo_epochs: int = option(4, "Passes over each rollout batch.", TRAINING)
    learning_rate: float = option(1e-5, "AdamW learning rate.", TRAINING)
    pure_bf16: bool = pure_bf16_option()
    kl_coef: float = option(0.05, "Initial coefficient of the per-token KL penalty to the starting policy.", METHOD)
    target_kl: float | None = option(None, "Adapt --kl-coef towards this KL per response (Ziegler et al.).", METHOD)
    max_kl: float | None = option(None, "Stop the run when the mean KL per response exceeds this.", METHOD)
    gamma: float = option(1.0, "Discount per token (GAE gamma).", TRAINING)
    lam: float = option(0.95, "GAE lambda.", TRAINING)
    clip_range: float = option(0.2, "Policy ratio clip: the new/old probability ratio is held within 1 +- this.",
                               TRAINING)
    clip_range_value: float = option(0.2, "Value clip: a value estimate moves at most this far per update.", TRAINING)
    value_coef: float = option(0.1, "Weight of the value loss.", TRAINING)
    whiten_advantages: bool = option(True, "Whiten advantages over each rollout batch.", TRAINING)
    normalise_rewards: bool = option(True, "Scale PM scores by their running mean and std before clipping.", METHOD)
    reward_clip: float = option(5.0, "Clip normalised rewards to +-this.", METHOD)
    missing_eos_penalty: float = option(
        1.0, "Subtracted from the reward of responses cut off without an end-of-sequence token.", METHOD)
    max_new_tokens: int = option(48, "Tokens per response.", SAMPLING, settings="stage")
    temperature: float = option(1.0, "Rollout sampling temperature.", SAMPLING, settings="stage")
    heldout: float = option(0.1, "Share of prompts held out to measure reward before and after.", METHOD)
    sample_every: int = option(10, "Log a sample response every N steps.", RUNS)
    save_every: int = option(25, "Checkpoint every N steps (a re-run resumes).", RUNS)
    lora: bool = option(False, "Train a LoRA adapter; the reference is the base with the adapter off.", LORA)
    lora_r: int = option(16, "LoRA rank.", LORA)
    lora_alpha: int = option(32, "LoRA alpha.", LORA)
    pm_max_length: int = option(512, "Tokens of each transcript the PM reads, kept from the end.", METHOD)
    resume: bool = option(
        False, "Require a checkpoint to resume from (a re-run resumes from one it finds anyway).", RUNS)
    seed: int = common("seed", 0)
    overwrite: bool = option(False, "Replace an earlier policy in OUT.", RUNS)

    def check(self) -> None:
        problems = []
        ppo = self.algo == "ppo"
        if self.algo not in ALGOS:
            problems.append(f"--algo {self.algo!r}: choose one of {', '.join(ALGOS)}")
        elif not ppo and (self.num_generations < 2 or self.batch_size % self.num_generations):
            problems.append("--algo rloo/grpo: --num-generations must be >= 2 and divide --batch-size")
        elif not ppo and batch_split_problem(self.batch_size):
            problems.append(batch_split_problem(self.batch_size))
        elif ppo and world_size() > 1:
            problems.append(f"--algo ppo runs in one process, and this is one of {world_size()}: run it without "
                            "torchrun / accelerate launch, or use --algo rloo or grpo, which run on several")
        given = changed_flags(self, PPO_ONLY)
        if self.algo in ALGOS and not ppo and given:
            problems.append(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to --algo ppo: leave "
                            f"{'it' if len(given) == 1 else 'them'} out with --algo {self.algo}")
        if self.reward not in REWARDS:
            problems.append(f"--reward {self.reward!r}: choose one of {', '.join(REWARDS)}")
        elif self.reward == "judge" and not self.judge:
            problems.append("--reward judge needs --judge MODEL (the feedback model)")
        elif self.reward == "pm" and not self.pm:
            problems.append("--reward pm needs --pm FOLDER (caictl train-pm output), or use --reward judge "
                            "--judge MODEL")
        if self.judge_mode not in JUDGE_MODES:
            problems.append(f"--judge-mode {self.judge_mode!r}: choose one of {', '.join(JUDGE_MODES)}")
        folders = [("--policy", self.policy)] + ([("--pm", self.pm)] if self.reward == "pm" and self.pm else [])
        for name, path in folders:
            if not path or not Path(path).exists():
                problems.append(f"{name} {path}: no such folder (a caictl sft / train-pm output)")
        # The minibatches and epochs are caictl's PPO's: TRL's path refuses them above when given.
        if self.batch_size < 2 or (ppo and not 1 <= self.minibatch_size <= self.batch_size):
            problems.append("--batch-size must be >= 2 and --minibatch-size in [1, batch size]")
        if self.steps < 1 or (ppo and self.ppo_epochs < 1) or self.max_new_tokens < 1:
            problems.append("--steps, --ppo-epochs and --max-new-tokens must be at least 1")
        if not 0 <= self.heldout < 1:
            problems.append("--heldout must be in [0, 1)")
        if self.kl_coef < 0:
            problems.append("--kl-coef must be >= 0")
        if self.temperature <= 0:
            problems.append("--temperature must be > 0 (rollouts are sampled)")
        if precision_problem(self.pure_bf16, self.lora):
            problems.append(precision_problem(self.pure_bf16, self.lora))
        if problems:
            raise UsageError("; ".join(problems))


def run(config: PPOConfig) -> dict:
    config.check()
    model_kind.check(config.policy, model_kind.CAUSAL_LM, "--policy")
    if config.reward == "pm":
        model_kind.check(config.pm, model_kind.SEQ_CLS, "--pm")
    else:
        model_kind.check(config.judge, model_kind.CAUSAL_LM, "--judge")
    out = output_folder(config.out, config.overwrite)
    if config.resume and not (checkpoint_folder(out) / "state.pt").exists() and \
            not list((out / "checkpoints").glob("checkpoint-*")):
        raise UsageError(f"--resume: no checkpoint in {config.out}")
    train, heldout = split_prompts(read_prompts(config.prompts), config.heldout, config.seed)
    if len(train) < 2:
        raise UsageError("ppo needs at least 2 training prompts (after holding some out)")
    metrics = PPO(config).train(train, heldout) if config.algo == "ppo" else run_trl(config, train, heldout)
    if is_main():  # the main process writes caictl.json and reports
        finish(config, out, metrics)
    return metrics


def split_prompts(prompts: list, share: float, seed: int) -> tuple[list, list]:
    """(training prompts, held-out prompts): a seeded shuffle, then `share` of them held out."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_heldout = round(len(prompts) * share) if share else 0
    return [prompts[i] for i in order[n_heldout:]], [prompts[i] for i in order[:n_heldout]]


def finish(config: PPOConfig, out: Path, metrics: dict) -> None:
    """caictl.json beside the saved policy, whichever algorithm trained it, and the summary. caictl's PPO keeps its
    checkpoint until caictl.json marks the run finished: a run killed before that resumes from it."""
    warn_reward_cuts(metrics[truncated_key(config)], config)
    write_model_info(out, "ppo", {"policy": config.policy, "pm": config.pm, "reward": config.reward,
                                  "judge": config.judge}, options=config,
                     extra={"precision": precision(config.pure_bf16, config.lora).label}, metrics=metrics)
    shutil.rmtree(checkpoint_folder(out), ignore_errors=True)
    rows = [("out", out), ("steps", metrics["steps"]),
            ("held-out reward before -> after", (metrics["heldout_reward_before"], metrics["heldout_reward_after"])),
            ("KL (last step)", metrics["kl"]), ("seconds per step", metrics["seconds_per_step"])]
    if config.algo == "ppo":
        rows.append(("stopped early", metrics["stopped"] or "no"))
    summary_table("ppo" if config.algo == "ppo" else f"ppo --algo {config.algo}", rows)


def changed_flags(config, names: tuple[str, ...]) -> list[str]:
    """The flags, as a user writes them, of the fields among `names` whose value is not their default."""
    return [_flag(f, getattr(config, f.name)) for f in fields(config)
            if f.name in names and getattr(config, f.name) != f.default]


def _flag(field: Field, value) -> str:
    """The flag as written to set `value`: a switch's on or off form."""
    declared = declaration(field.name, field.metadata, isinstance(value, bool))
    on, _, off = declared.partition("/")
    return off if isinstance(value, bool) and not value else on
