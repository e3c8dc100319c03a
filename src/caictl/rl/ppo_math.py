"""The arithmetic of caictl's PPO, as plain functions of tensors, tested against hand-worked numbers.

Shapes: [batch, T] over the response tokens of a rollout batch, with a 0/1 mask of the tokens that count (up to
and including each response's first end of sequence). torch is imported inside each function: importing this
module costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


def position_ids(attention):
    """Positions that count only attended tokens, as generate() derives them: without them a left-padded row's
    tokens sit further along than they did when sampled, which changes models with absolute positions."""
    return (attention.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(logits, ids, start: int, temperature: float):
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
    """Running mean and standard deviation of the reward scores (--normalise-rewards); a checkpoint keeps it."""

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
