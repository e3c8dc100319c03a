"""ppo: reinforcement learning of the policy against the preference model, with a KL penalty.

    caictl ppo examples/red-team.jsonl --policy models/sl-cai --pm models/pm -o models/rl-cai

caictl's own compact PPO (Schulman et al. 2017, as used for RLHF by Ziegler et al. 2019 and the paper):
rollouts are sampled from the policy in-process; the reward is the PM's score of prompt + response (the PM
re-tokenises the text with its own tokenizer); every response token pays a KL penalty to the frozen starting
policy (fixed `--kl-coef`, or adapted towards `--target-kl`); GAE gives advantages; the policy ratio and the
value loss are clipped; several minibatch epochs run per rollout batch. The value head is one linear layer
on the policy's last hidden state: it shares the policy's trunk, so no second model sits in memory.
Log-probabilities are those of the distribution the rollouts were sampled from (logits / --temperature), as in
TRL. Both paths measure the held-out reward with one function, `heldout_reward`.
`--algo rloo|grpo` runs the same job through TRL's RLOOTrainer / GRPOTrainer, with the PM as the reward
function (scoring the same transcripts with its own tokenizer), for users who prefer those and for several
processes: `torchrun --nproc_per_node N -m caictl ppo --algo grpo ...` or `accelerate launch --num_processes N -m
caictl ppo --algo grpo ...`, --batch-size the whole step's completions, each process generating an equal share.
caictl's own PPO runs in one process and refuses to start under several.
`--reward judge --judge MODEL` scores rollouts with the feedback model instead of a PM, on either path
(caictl.feedback.judge_reward: a 1-9 rating, or pairwise against the starting policy's greedy reply).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from caictl import __version__
from caictl.data.control_text import ContentEncoder
from caictl.data.records import read_prompts
from caictl.errors import UsageError
from caictl.evaluation.textstats import boilerplate
from caictl.feedback.judge_reward import JUDGE_MODES
from caictl.models import kind as model_kind
from caictl.models.processes import is_main, world_size
from caictl.models.training import batch_split_problem, output_folder, per_process
from caictl.ui import log, meter, quiet_transformers, summary_table

ALGOS = ("ppo", "rloo", "grpo")
REWARDS = ("pm", "judge")


@dataclass
class PPOConfig:
    prompts: str | None  # prompt file (revise/sample inputs); None or "-" reads stdin
    policy: str  # the starting policy folder (the SL-CAI model)
    pm: str | None  # a train-pm folder (--reward pm)
    out: str
    reward: str = "pm"  # pm: the preference model scores rollouts; judge: the feedback model does (d-RLAIF)
    judge: str | None = None  # --reward judge: the feedback model (a causal LM folder or hub id)
    judge_mode: str = "rating"  # rating (1-9, probability-weighted) or pairwise (against the starting policy)
    constitution: str = "harmless"  # --reward judge: the principles rollouts are judged under
    algo: str = "ppo"  # ppo (caictl's own), rloo or grpo (TRL's trainers)
    num_generations: int = 4  # rloo/grpo: responses per prompt compared with each other
    steps: int = 50  # rollout batches (PPO iterations)
    batch_size: int = 16  # rollouts per step, over all processes (rloo/grpo under torchrun / accelerate launch)
    minibatch_size: int = 8
    ppo_epochs: int = 4  # passes over each rollout batch
    learning_rate: float = 1e-5
    kl_coef: float = 0.05  # initial coefficient of the per-token KL penalty
    target_kl: float | None = None  # adapt kl_coef towards this KL per response (Ziegler et al.)
    max_kl: float | None = None  # stop the run when the mean KL per response exceeds this
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    value_coef: float = 0.1
    whiten_advantages: bool = True
    normalise_rewards: bool = True  # scale PM scores by the running mean and std
    reward_clip: float = 5.0  # after normalisation
    missing_eos_penalty: float = 1.0  # subtracted from responses cut off without an end of sequence
    max_new_tokens: int = 48
    temperature: float = 1.0
    heldout: float = 0.1  # share of prompts held out to measure reward before and after
    sample_every: int = 10  # log sample responses every N steps
    save_every: int = 25  # checkpoint every N steps
    lora: bool = False  # train a LoRA adapter; the reference is the base with the adapter switched off
    lora_r: int = 16
    lora_alpha: int = 32
    pm_max_length: int = 512
    resume: bool = False  # require a checkpoint to resume from (a re-run resumes by itself when one exists)
    seed: int = 0
    overwrite: bool = False

    def check(self) -> None:
        problems = []
        if self.algo not in ALGOS:
            problems.append(f"--algo {self.algo!r}: choose one of {', '.join(ALGOS)}")
        elif self.algo != "ppo" and (self.num_generations < 2 or self.batch_size % self.num_generations):
            problems.append("--algo rloo/grpo: --num-generations must be >= 2 and divide --batch-size")
        elif self.algo != "ppo" and batch_split_problem(self.batch_size):
            problems.append(batch_split_problem(self.batch_size))
        elif self.algo == "ppo" and world_size() > 1:
            problems.append(f"--algo ppo runs in one process, and this is one of {world_size()}: run it without "
                            "torchrun / accelerate launch, or use --algo rloo or grpo, which run on several")
        if self.reward not in REWARDS:
            problems.append(f"--reward {self.reward!r}: choose one of {', '.join(REWARDS)}")
        elif self.reward == "judge" and not self.judge:
            problems.append("--reward judge needs --judge MODEL (the feedback model)")
        if self.judge_mode not in JUDGE_MODES:
            problems.append(f"--judge-mode {self.judge_mode!r}: choose one of {', '.join(JUDGE_MODES)}")
        folders = [("--policy", self.policy)] + ([("--pm", self.pm)] if self.reward == "pm" else [])
        for name, path in folders:
            if not path or not Path(path).exists():
                problems.append(f"{name} {path}: no such folder (a caictl sft / train-pm output)")
        if self.batch_size < 2 or self.minibatch_size < 1 or self.minibatch_size > self.batch_size:
            problems.append("--batch-size must be >= 2 and --minibatch-size in [1, batch size]")
        if self.steps < 1 or self.ppo_epochs < 1 or self.max_new_tokens < 1:
            problems.append("--steps, --ppo-epochs and --max-new-tokens must be at least 1")
        if not 0 <= self.heldout < 1:
            problems.append("--heldout must be in [0, 1)")
        if self.kl_coef < 0:
            problems.append("--kl-coef must be >= 0")
        if self.temperature <= 0:
            problems.append("--temperature must be > 0 (rollouts are sampled)")
        if problems:
            raise UsageError("; ".join(problems))


def run(config: PPOConfig) -> dict:
    config.check()
    model_kind.check(config.policy, model_kind.CAUSAL_LM, "--policy")
    if config.reward == "pm":
        model_kind.check(config.pm, model_kind.SEQ_CLS, "--pm")
    else:
        model_kind.check(config.judge, model_kind.CAUSAL_LM, "--judge")
    output_folder(config.out, config.overwrite)
    if config.resume and not (Path(config.out) / "checkpoint" / "state.pt").exists() and \
            not list((Path(config.out) / "checkpoints").glob("checkpoint-*")):
        raise UsageError(f"--resume: no checkpoint in {config.out}")
    train, heldout = split_prompts(read_prompts(config.prompts), config.heldout, config.seed)
    if len(train) < 2:
        raise UsageError("ppo needs at least 2 training prompts (after holding some out)")
    if config.algo != "ppo":
        return run_trl(config, train, heldout)
    return PPO(config).train(train, heldout)


def split_prompts(prompts: list, share: float, seed: int) -> tuple[list, list]:
    """(training prompts, held-out prompts): a seeded shuffle, then `share` of them held out."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_heldout = round(len(prompts) * share) if share else 0
    return [prompts[i] for i in order[n_heldout:]], [prompts[i] for i in order[:n_heldout]]


def run_trl(config: PPOConfig, train, heldout) -> dict:
    """The same job through TRL's RLOOTrainer or GRPOTrainer, the PM as the reward function."""
    import sys

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from caictl.models.pm import conversation_text
    from caictl.models.training import trl_device_args

    quiet_transformers()
    if config.algo == "grpo":
        from trl import GRPOConfig as TRLConfig
        from trl import GRPOTrainer as TRLTrainer
    else:
        from trl import RLOOConfig as TRLConfig
        from trl import RLOOTrainer as TRLTrainer
    scorer = reward_model(config)
    cuts = scorer.cuts()

    scored = 0  # rollouts this process has scored

    def pm_reward(prompts, completions, **_):
        nonlocal scored
        responses = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards = scorer.score_responses(prompts, responses)
        # After scoring: the judge reward knows what it cut only once it has asked.
        for cut in scorer.cut_tokens([conversation_text(p, r) for p, r in zip(prompts, responses)]):
            cuts.count(cut)
        scored += len(responses)
        return rewards

    device_args, _ = trl_device_args(TRLConfig)
    args = TRLConfig(
        output_dir=str(Path(config.out) / "checkpoints"), max_steps=config.steps, learning_rate=config.learning_rate,
        per_device_train_batch_size=per_process(config.batch_size), num_generations=config.num_generations,
        max_completion_length=config.max_new_tokens, temperature=config.temperature, beta=config.kl_coef,
        seed=config.seed, logging_steps=1, save_strategy="steps", save_steps=config.save_every, save_total_limit=1,
        report_to="none", **device_args,
    )
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(config.policy)
    pm_reward.__name__ = config.reward  # TRL logs each reward function by name
    # TRL reloads the reference from the policy's folder (model.config._name_or_path): pass the path.
    trainer = TRLTrainer(model=config.policy, reward_funcs=[pm_reward], args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": p.messages} for p in train]),
                         peft_config=peft_config)
    out = Path(config.out)
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    seconds = time.perf_counter() - start
    # Each process scored its own share of the rollouts: the counts are summed over all of them.
    scored, cut_rollouts = trainer.accelerator.reduce(torch.tensor([scored, cuts.rows]), reduction="sum").tolist()
    if not config.lora:
        trainer.save_model(str(out))  # on every process: under FSDP or ZeRO-3 it gathers the shards from all
    if not is_main():  # the main process writes the folder, measures the held-out reward, and reports
        return {}
    if config.lora:
        trainer.model.merge_and_unload().save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)

    logs = [e for e in trainer.state.log_history if "loss" in e]
    history = [{"step": e["step"], "reward_mean": e.get("reward"), "reward_std": e.get("reward_std"),
                "kl": e.get("kl"), "entropy": e.get("entropy"), "response_length": e.get("completions/mean_length"),
                "loss": e.get("loss")} for e in logs]
    metrics = {"algo": config.algo, "steps": trainer.state.global_step, "heldout_prompts": len(heldout),
               "heldout_reward_before": heldout_reward(config.policy, heldout, scorer, config),
               "heldout_reward_after": heldout_reward(out, heldout, scorer, config),
               "kl": history[-1]["kl"] if history else None, "rollouts": scored, truncated_key(config): cut_rollouts,
               "seconds": round(seconds, 2),
               "seconds_per_step": round(seconds / max(trainer.state.global_step, 1), 3), "history": history}
    warn_reward_cuts(cut_rollouts, config)
    write_info(out, config, metrics)
    summary_table(f"ppo --algo {config.algo}", [
        ("output", out), ("steps", metrics["steps"]),
        ("held-out reward before -> after", f"{metrics['heldout_reward_before']} -> {metrics['heldout_reward_after']}"),
        ("KL (last step)", metrics["kl"]), ("seconds per step", metrics["seconds_per_step"])])
    return metrics


class PPO:
    def __init__(self, config: PPOConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_transformers()
        self.config = config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(config.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(config.policy)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Prompts are encoded with message content as plain text: only the template's markup is special.
        self.encoder = ContentEncoder(self.tokenizer)
        # Eval mode throughout: dropout would add noise to the PPO ratio and the KL against the reference.
        policy = AutoModelForCausalLM.from_pretrained(config.policy).to(self.device).eval()
        # A response ends at any of the family's end-of-turn ids, not only the tokenizer's eos.
        stops = policy.generation_config.eos_token_id
        stops = stops if isinstance(stops, list) else [stops] if stops is not None else []
        self.stop_ids = stops or [self.tokenizer.eos_token_id]
        if config.lora:
            from peft import LoraConfig, get_peft_model

            policy = get_peft_model(policy, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
            self.reference = None  # the same model with its adapter switched off
        else:
            self.reference = AutoModelForCausalLM.from_pretrained(config.policy).to(self.device).eval()
            self.reference.requires_grad_(False)
        self.policy = policy
        hidden = policy.config.hidden_size if hasattr(policy.config, "hidden_size") else policy.config.d_model
        self.value_head = torch.nn.Linear(hidden, 1).to(self.device)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        parameters = [p for p in policy.parameters() if p.requires_grad] + list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate)
        if config.lora:  # the reference is the policy's own base model, run with the adapter switched off
            self.scorer = reward_model(config, policy.get_base_model(), policy.disable_adapter)
        else:
            self.scorer = reward_model(config, self.reference)
        self.kl_coef = config.kl_coef
        self.reward_stats = RunningMoments()
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)

    # The loop -------------------------------------------------------------------------------------------

    def train(self, train, heldout) -> dict:
        config = self.config
        out = Path(config.out)
        start_step, history, before = self._resume(out)
        if start_step == 0 and heldout:
            before = heldout_reward(config.policy, heldout, self.scorer, config)
            log(f"held-out reward before: {before:.4f}")
        start = time.perf_counter()
        stopped = None
        with meter(config.steps - start_step, "ppo", unit="steps") as progress:
            for step in range(start_step + 1, config.steps + 1):
                # Seeded by the step, so a resumed run draws the batches an uninterrupted one would.
                rng = random.Random(f"{config.seed}:{step}")
                batch = [train[rng.randrange(len(train))] for _ in range(config.batch_size)]
                stats = self.step(batch, step)
                history.append(stats)
                progress.advance(1)
                line = (f"step {step}/{config.steps}: reward {stats['reward_mean']:.3f}, kl {stats['kl']:.3f}, "
                        f"response length {stats['response_length']:.1f} tokens")
                if config.sample_every and step % config.sample_every == 0:
                    line += f", sample: {stats['sample']!r}"
                log(line)
                if config.save_every and step % config.save_every == 0 and step < config.steps:
                    self._checkpoint(out, step, history, before)
                if config.max_kl is not None and stats["kl"] > config.max_kl:
                    stopped = f"KL {stats['kl']:.3f} exceeded --max-kl {config.max_kl} at step {step}"
                    log(f"[red]stopping: {stopped}[/red]")
                    break
        seconds = time.perf_counter() - start
        self.save(out)
        # Measured on the saved folder, as the reward before was on --policy's (and as run_trl does).
        after = heldout_reward(out, heldout, self.scorer, config)
        metrics = {
            "steps": len(history),
            "heldout_prompts": len(heldout),
            "heldout_reward_before": before,
            "heldout_reward_after": after,
            "kl": history[-1]["kl"] if history else None,
            "mean_kl_last_5": sum(h["kl"] for h in history[-5:]) / max(len(history[-5:]), 1),
            "kl_coef_final": self.kl_coef,
            "stopped": stopped,
            truncated_key(config): sum(h.get(truncated_key(config), 0) for h in history),
            "seconds": round(seconds, 2),
            "seconds_per_step": round(seconds / max(len(history) - start_step, 1), 3),
            "history": [{k: v for k, v in h.items() if k != "sample"} for h in history],
        }
        warn_reward_cuts(metrics[truncated_key(config)], config)
        write_info(out, config, metrics)
        plot_history(metrics["history"], out / "ppo.png")
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
        summary_table("ppo", [("output", out), ("steps", len(history)),
                              ("held-out reward before -> after", f"{before} -> {after}"),
                              ("KL (last step)", metrics["kl"]), ("seconds per step", metrics["seconds_per_step"]),
                              ("stopped early", stopped or "no")])
        return metrics

    def step(self, prompts, step: int) -> dict:
        import torch

        config = self.config
        rollout = self.rollout(prompts)
        rewards = self.scorer.score_responses([p.messages for p in prompts], rollout["responses"])
        scores = torch.tensor(rewards, dtype=torch.float32, device=self.device)
        cut_rollouts = sum(cut > 0 for cut in self.scorer.cut_tokens(rollout["texts"]))
        raw_scores = scores.clone()
        if config.normalise_rewards:
            self.reward_stats.update(scores.tolist())
            scores = (scores - self.reward_stats.mean) / max(self.reward_stats.std, 1e-6)
        scores = scores.clamp(-config.reward_clip, config.reward_clip)
        scores = scores - config.missing_eos_penalty * (~rollout["ended"]).float().to(self.device)

        mask = rollout["mask"]
        with torch.no_grad():
            old_logprobs, values, _ = self.forward(rollout["ids"], rollout["attention"], rollout["start"])
            ref_logprobs = self.reference_logprobs(rollout)
        kl_tokens = (old_logprobs - ref_logprobs) * mask
        rewards = -self.kl_coef * kl_tokens
        last = mask.sum(1).long() - 1  # index of each response's last token
        rewards[torch.arange(len(last)), last.clamp(min=0)] += scores
        advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = whiten(advantages, mask)

        stats = Counter()
        n = len(prompts)
        for _ in range(config.ppo_epochs):
            order = torch.randperm(n, generator=self.generator)
            for first in range(0, n, config.minibatch_size):
                idx = order[first:first + config.minibatch_size]
                logprobs, new_values, entropy = self.forward(rollout["ids"][idx], rollout["attention"][idx],
                                                             rollout["start"])
                m = mask[idx]
                pg_loss, clip_fraction = policy_loss(logprobs, old_logprobs[idx], advantages[idx], m,
                                                     config.clip_range)
                v_loss = value_loss(new_values, values[idx], returns[idx], m, config.clip_range_value)
                loss = pg_loss + config.value_coef * v_loss
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.policy.parameters() if p.requires_grad] + list(self.value_head.parameters()), 1.0)
                self.optimizer.step()
                stats["policy_loss"] += pg_loss.item()
                stats["value_loss"] += v_loss.item()
                stats["clip_fraction"] += clip_fraction
                stats["entropy"] += masked_mean(entropy, m).item()
                stats["updates"] += 1
        # Reported KL per response: the k3 estimator (exp(-x) - 1 + x of the log-ratio x) is never negative,
        # unlike the plain log-ratio that the penalty uses (Schulman, "Approximating KL divergence").
        kl = (((-kl_tokens).exp() - 1 + kl_tokens) * mask).sum(1).mean().item()
        if config.target_kl is not None:
            self.kl_coef = adaptive_kl(self.kl_coef, kl, config.target_kl, config.batch_size)
        updates = stats.pop("updates")
        lengths = mask.sum(1)
        return {
            "step": step,
            "reward_mean": raw_scores.mean().item(),
            "reward_std": raw_scores.std().item(),
            "kl": kl,
            "kl_coef": self.kl_coef,
            **{k: v / updates for k, v in stats.items()},
            "response_length": lengths.float().mean().item(),
            "ended_with_eos": rollout["ended"].float().mean().item(),
            "boilerplate_share": boilerplate_share(rollout["responses"]),
            truncated_key(config): cut_rollouts,
            "sample": rollout["responses"][0],
        }

    # Model calls ----------------------------------------------------------------------------------------

    def rollout(self, prompts) -> dict:
        """Sample one response per prompt. ids: [batch, prompt width + response width], prompts left-padded."""
        import torch

        config = self.config
        ids = self.encoder.encode_chats([p.messages for p in prompts], add_generation_prompt=True)
        encoded = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(self.device)
        with torch.no_grad():
            output = self.policy.generate(**encoded, max_new_tokens=config.max_new_tokens, do_sample=True,
                                          temperature=config.temperature, top_k=0, top_p=1.0,
                                          pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stop_ids)
        start = encoded["input_ids"].shape[1]
        response = output[:, start:]
        is_eos = torch.isin(response, torch.tensor(self.stop_ids, device=response.device))
        ended = is_eos.any(1)
        # Response tokens up to and including the first end of sequence.
        first_eos = torch.where(ended, is_eos.float().argmax(1),
                                torch.full_like(ended, response.shape[1], dtype=torch.long))
        positions = torch.arange(response.shape[1], device=response.device).unsqueeze(0)
        mask = (positions <= first_eos.unsqueeze(1)).float()
        attention = torch.cat([encoded["attention_mask"], mask.long()], dim=1)
        responses = [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip()
                     for r, m in zip(response, mask)]
        from caictl.models.pm import conversation_text

        return {"ids": output, "attention": attention, "start": start, "mask": mask, "ended": ended.cpu(),
                "responses": responses,
                "texts": [conversation_text(p.messages, r) for p, r in zip(prompts, responses)]}

    def forward(self, ids, attention, start: int):
        """Per response token: log-prob under the policy, value, entropy. Shapes [batch, response width]."""
        import torch

        # Logits only where a response token is predicted: the prompt's would be computed and thrown away.
        output = self.policy(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention),
                             output_hidden_states=True, logits_to_keep=ids.shape[1] - start + 1)
        logprobs_all, logprobs = _response_logprobs(output.logits, ids, start, self.config.temperature)
        with torch.no_grad():  # logged only: no graph for a [batch, width, vocabulary] tensor
            entropy = -(logprobs_all.exp() * logprobs_all).sum(-1)
        hidden = output.hidden_states[-1][:, start - 1:-1].float()
        values = self.value_head(hidden).squeeze(-1)
        return logprobs, values, entropy

    def reference_logprobs(self, rollout):
        ids, attention, start = rollout["ids"], rollout["attention"], rollout["start"]
        inputs = {"input_ids": ids, "attention_mask": attention, "position_ids": position_ids(attention),
                  "logits_to_keep": ids.shape[1] - start + 1}
        if self.reference is None:
            with self.policy.disable_adapter():
                logits = self.policy(**inputs).logits
        else:
            logits = self.reference(**inputs).logits
        return _response_logprobs(logits, ids, start, self.config.temperature)[1]

    # Saving and resuming --------------------------------------------------------------------------------

    def _checkpoint(self, out: Path, step: int, history: list[dict], before: float | None) -> None:
        import torch

        folder = out / "checkpoint"
        folder.mkdir(parents=True, exist_ok=True)
        self.policy.save_pretrained(folder / "policy")
        # Everything the next step reads: a resumed run must take exactly the steps an uninterrupted one does.
        torch.save({"step": step, "value_head": self.value_head.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "kl_coef": self.kl_coef, "reward_stats": asdict(self.reward_stats), "history": history,
                    "heldout_reward_before": before, "generator": self.generator.get_state(),
                    "rng": rng_states()}, folder / "state.pt")

    def _resume(self, out: Path) -> tuple[int, list[dict], float | None]:
        """(step, history, held-out reward before training) from the last checkpoint, if any."""
        import torch

        state_file = out / "checkpoint" / "state.pt"
        if not state_file.exists():
            return 0, [], None
        state = torch.load(state_file, weights_only=False)
        from transformers import AutoModelForCausalLM

        if self.config.lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            adapter = load_file(out / "checkpoint" / "policy" / "adapter_model.safetensors")
            set_peft_model_state_dict(self.policy, adapter)
        else:
            loaded = AutoModelForCausalLM.from_pretrained(out / "checkpoint" / "policy")
            self.policy.load_state_dict(loaded.state_dict())
        self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_coef = state["kl_coef"]
        self.reward_stats = RunningMoments(**state["reward_stats"])
        self.generator.set_state(state["generator"])
        # Last: loading the checkpoint's policy above may draw from the global RNG.
        set_rng_states(state["rng"])
        log(f"resuming from step {state['step']} in {out / 'checkpoint'}")
        return state["step"], state["history"], state["heldout_reward_before"]

    def save(self, out: Path) -> None:
        """The trained policy (LoRA merged into the base), its tokenizer and the value head."""
        import torch

        out.mkdir(parents=True, exist_ok=True)
        policy = self.policy.merge_and_unload() if self.config.lora else self.policy
        policy.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        torch.save(self.value_head.state_dict(), out / "value_head.pt")


# What both algorithms share -------------------------------------------------------------------------------


def reward_model(config: PPOConfig, reference=None, reference_on=contextlib.nullcontext):
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


def heldout_reward(model: str | Path, prompts: list, scorer, config: PPOConfig) -> float | None:
    """Mean reward (PM or judge) of one response to each held-out prompt by the model folder; None without prompts.

    Both algorithms measure before and after training this way. Every response is sampled by the hf engine with
    its own seed (config.seed, prompt id), so the number depends neither on the batch size nor on the global RNG,
    and the same folder and seed give the same number whichever path asks."""
    from caictl.engines import SamplingParams, load_engine

    if not prompts:
        return None
    engine = load_engine("hf", str(model), batch_size=config.batch_size)
    params = SamplingParams(config.max_new_tokens, config.temperature, 1.0, (), config.seed)
    responses = engine.generate([p.messages for p in prompts], params, [p.id for p in prompts])
    scores = scorer.score_responses([p.messages for p in prompts], [r.text for r in responses])
    return round(sum(scores) / len(scores), 4)


def truncated_key(config: PPOConfig) -> str:
    """caictl.json's count of rollouts the reward read cut: to the PM's --pm-max-length, or the judge's context."""
    return "judge_truncated_rollouts" if config.reward == "judge" else "pm_truncated_rollouts"


def warn_reward_cuts(rollouts: int, config: PPOConfig) -> None:
    if not rollouts:
        return
    if config.reward == "judge":
        log(f"warning: {rollouts} rollout(s) did not fit the context of the --judge model {config.judge}: their "
            "questions to it were cut from the front before it scored them; each step's count is "
            "judge_truncated_rollouts in caictl.json")
    else:
        log(f"warning: {rollouts} rollout(s) were longer than --pm-max-length {config.pm_max_length} and were cut "
            "from the front before the PM scored them; each step's count is pm_truncated_rollouts in caictl.json")


def write_info(out: Path, config: PPOConfig, metrics: dict) -> None:
    """caictl.json beside the model, whichever algorithm trained it. Written once the model is saved: its presence
    marks a finished run, which output_folder refuses to train over."""
    info = {"stage": "ppo", "caictl_version": __version__, "world_size": world_size(), "policy": config.policy,
            "pm": config.pm, "reward": config.reward, "judge": config.judge,
            "options": asdict(config), "metrics": metrics}
    (out / "caictl.json").write_text(json.dumps(info, indent=2) + "\n")


def rng_states() -> dict:
    """The global generators a checkpoint keeps: torch's (generate() samples the rollouts with it), CUDA's, and
    Python's (for any library that draws from it)."""
    import torch

    return {"torch": torch.random.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    import torch

    torch.random.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


# The arithmetic, as plain functions (tested against hand-worked numbers) ----------------------------------


def position_ids(attention):
    """Positions that count only attended tokens, as generate() derives them: without them a left-padded row's
    tokens sit further along than they did when sampled, which changes models with absolute positions."""
    return (attention.long().cumsum(-1) - 1).clamp(min=0)


def _response_logprobs(logits, ids, start: int, temperature: float):
    """From logits kept for positions start-1 onwards: log-softmax over the vocabulary at each response position,
    and the log-prob of the token actually there. Logits are divided by the sampling temperature: the ratio, the
    KL and the entropy are those of the distribution the rollouts were drawn from."""
    import torch

    logprobs_all = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logprobs_all, logprobs_all.gather(-1, ids[:, start:].unsqueeze(-1)).squeeze(-1)


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values, mask, eps: float = 1e-8):
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * (variance + eps).rsqrt() * mask


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens ([batch, T]); masked steps contribute nothing.
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; returns = A + V."""
    import torch

    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float):
    """The clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1 - e, 1 + e)); and the share clipped."""
    import torch

    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    fraction = masked_mean((clipped > unclipped).float(), mask).item()
    return loss, fraction


def value_loss(values, old_values, returns, mask, clip_range: float):
    """0.5 * mean of max((V - R)^2, (clip(V, V_old +- e) - R)^2)."""
    import torch

    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def adaptive_kl(coef: float, kl: float, target: float, batch: int, horizon: int = 10000) -> float:
    """Ziegler et al.'s proportional controller: move the coefficient so that KL approaches the target."""
    error = max(min(kl / target - 1, 0.2), -0.2)
    return coef * (1 + error * batch / horizon)


@dataclass
class RunningMoments:
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @property
    def std(self) -> float:
        return (self.m2 / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0

    def update(self, values: list[float]) -> None:
        for value in values:  # Welford
            self.count += 1
            delta = value - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (value - self.mean)


def boilerplate_share(responses: list[str], n: int = 6) -> float:
    """Share of responses that contain a long word n-gram also found in another response of the batch: the
    paper's sign of Goodharting (the same stock phrases everywhere)."""
    flags, _ = boilerplate(responses, n=n, min_count=2)
    return sum(flags) / len(responses) if responses else 0.0


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["reward_mean", "kl", "entropy", "response_length", "clip_fraction", "boilerplate_share"]
    figure, axes = plt.subplots(2, 3, figsize=(11, 6))
    steps = [h["step"] for h in history]
    for axis, key in zip(axes.flat, keys):
        axis.plot(steps, [h.get(key, 0) for h in history])
        axis.set_title(key)
        axis.set_xlabel("step")
    figure.suptitle("caictl ppo")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
