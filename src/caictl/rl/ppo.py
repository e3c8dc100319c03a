"""caictl's own PPO (Schulman et al. 2017, as used for RLHF by Ziegler et al. 2019 and the paper), in one process.

Rollouts are sampled from the policy in-process; the reward is the PM's (or the judge's) score of prompt + response;
every response token pays a KL penalty to the frozen starting policy (fixed kl_coef, or adapted towards
target_kl); GAE gives advantages; the policy ratio and the value loss are clipped; several minibatch epochs run
per rollout batch. The value head is one linear layer on the policy's last hidden state: it shares the policy's
trunk, so no second model sits in memory. Log-probabilities are those of the distribution the rollouts were
sampled from (logits / temperature), as in TRL. The arithmetic is in caictl.rl.ppo_math.

Precision (caictl.models.training.precision): on a GPU with bf16 the policy keeps fp32 master weights and its
forward passes run under bf16 autocast; the frozen reference, which never trains, is held in bf16. --pure-bf16 holds
the policy in bf16 too. On a CPU everything is fp32.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from caictl.data.control_text import ContentEncoder
from caictl.engines.base import NO_SAMPLING_FILTERS, only_stop_ids, stop_ids
from caictl.evaluation.textstats import boilerplate
from caictl.models.training import precision, release_memory, save_model
from caictl.rl.ppo_math import (
    RunningMoments,
    adaptive_kl,
    gae,
    masked_mean,
    policy_loss,
    position_ids,
    response_logprobs,
    value_loss,
    whiten,
)
from caictl.rl.reward import heldout_reward, reward_model, truncated_key
from caictl.ui import log, meter, quiet_transformers


class PPO:
    def __init__(self, config):
        """config: the ppo stage's PPOConfig."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_transformers()
        self.config = config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision = precision(config.pure_bf16, config.lora)
        torch.manual_seed(config.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(config.policy)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Prompts are encoded with message content as plain text: only the template's markup is special.
        self.encoder = ContentEncoder(self.tokenizer)
        # Eval mode throughout: dropout would add noise to the PPO ratio and the KL against the reference.
        policy = AutoModelForCausalLM.from_pretrained(config.policy, dtype=self.precision.load).to(self.device).eval()
        self.stop_ids = stop_ids(self.tokenizer, policy.generation_config)
        if config.lora:
            from peft import LoraConfig, get_peft_model

            policy = get_peft_model(policy, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
            self.reference = None  # the same model with its adapter switched off
        else:
            # It never trains, so it needs no fp32 master: bf16 on a GPU (then the KL starts a little above 0).
            self.reference = AutoModelForCausalLM.from_pretrained(config.policy, dtype=self.precision.frozen)
            self.reference.to(self.device).eval()
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
        """Train from the last checkpoint in OUT (if any), save the policy, measure the held-out reward of the saved
        weights; return the metrics. The stage writes caictl.json, then removes the checkpoint."""
        config = self.config
        out = Path(config.out)
        start_step, history, before = self._resume(out)
        if start_step == 0 and heldout:
            # --policy's weights are in memory already: the reference, or the LoRA policy with its adapter off.
            if self.reference is None:
                starting, starting_on = self.policy.get_base_model(), self.policy.disable_adapter
            else:
                starting, starting_on = self.reference, contextlib.nullcontext
            before = heldout_reward(config.policy, heldout, self.scorer, config, starting, starting_on)
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
        after = self._heldout_reward_after(out, self.save(out), heldout)
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
        plot_history(metrics["history"], out / "ppo.png")
        return metrics

    def _heldout_reward_after(self, out: Path, trained, heldout) -> float | None:
        """The held-out reward of OUT, measured on `trained`, the weights just written there (LoRA: merged), rather
        than on another copy loaded while the policy, the reference and the optimizer's state are all in memory.
        Training is over: the optimizer's state goes first, and `trained` is cast to the dtype the hf engine would
        load OUT in (bf16 on a GPU, where the policy's fp32 masters would sample other tokens), so the number is
        the folder's."""
        if not heldout:
            return None
        self.optimizer = None
        release_memory()
        return heldout_reward(out, heldout, self.scorer, self.config, trained.to(self.precision.frozen))

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
        # Sampled from softmax(logits / temperature) and nothing else, computed as forward() computes it, the
        # distribution it scores: the model's own generation_config (top_k, top_p, repetition_penalty) would make
        # the PPO ratio wrong.
        with torch.no_grad(), only_stop_ids(self.policy), self.precision.autocast_on(self.device):
            output = self.policy.generate(**encoded, max_new_tokens=config.max_new_tokens, do_sample=True,
                                          temperature=config.temperature, **NO_SAMPLING_FILTERS,
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
        with self.precision.autocast_on(self.device):
            output = self.policy(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention),
                                 output_hidden_states=True, logits_to_keep=ids.shape[1] - start + 1)
        logprobs_all, logprobs = response_logprobs(output.logits, ids, start, self.config.temperature)
        with torch.no_grad():  # logged only: no graph for a [batch, width, vocabulary] tensor
            entropy = -(logprobs_all.exp() * logprobs_all).sum(-1)
        hidden = output.hidden_states[-1][:, start - 1:-1].float()
        values = self.value_head(hidden).squeeze(-1)
        return logprobs, values, entropy

    def reference_logprobs(self, rollout):
        ids, attention, start = rollout["ids"], rollout["attention"], rollout["start"]
        inputs = {"input_ids": ids, "attention_mask": attention, "position_ids": position_ids(attention),
                  "logits_to_keep": ids.shape[1] - start + 1}
        with self.precision.autocast_on(self.device):
            if self.reference is None:
                with self.policy.disable_adapter():
                    logits = self.policy(**inputs).logits
            else:
                logits = self.reference(**inputs).logits
        return response_logprobs(logits, ids, start, self.config.temperature)[1]

    # Saving and resuming --------------------------------------------------------------------------------

    def _checkpoint(self, out: Path, step: int, history: list[dict], before: float | None) -> None:
        import torch

        folder = checkpoint_folder(out)
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

        state_file = checkpoint_folder(out) / "state.pt"
        if not state_file.exists():
            return 0, [], None
        state = torch.load(state_file, weights_only=False)
        from transformers import AutoModelForCausalLM

        if self.config.lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            adapter = load_file(checkpoint_folder(out) / "policy" / "adapter_model.safetensors")
            set_peft_model_state_dict(self.policy, adapter)
        else:
            loaded = AutoModelForCausalLM.from_pretrained(checkpoint_folder(out) / "policy")
            self.policy.load_state_dict(loaded.state_dict())
        self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_coef = state["kl_coef"]
        self.reward_stats = RunningMoments(**state["reward_stats"])
        self.generator.set_state(state["generator"])
        # Last: loading the checkpoint's policy above may draw from the global RNG.
        set_rng_states(state["rng"])
        log(f"resuming from step {state['step']} in {checkpoint_folder(out)}")
        return state["step"], state["history"], state["heldout_reward_before"]

    def save(self, out: Path):
        """Write the trained policy (LoRA merged into the base), its tokenizer and the value head; return the policy
        as written (LoRA: the merged model, after which the peft policy is spent)."""
        import torch

        written = save_model(self.policy, self.tokenizer, out, merge=self.config.lora)
        torch.save(self.value_head.state_dict(), out / "value_head.pt")
        return written


def checkpoint_folder(out: str | Path) -> Path:
    """Where a run keeps what it resumes from: one checkpoint, replaced every --save-every steps, and removed once
    caictl.json marks the run finished."""
    return Path(out) / "checkpoint"


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
