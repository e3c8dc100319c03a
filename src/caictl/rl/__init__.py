"""Reinforcement learning of the policy against a reward, for `caictl ppo`: caictl's own PPO (rl.ppo, its
arithmetic in rl.ppo_math), TRL's RLOO and GRPO (rl.trl), and what both share: the reward, from the preference
model or the feedback model as a judge, and the held-out reward measured before and after (rl.reward).
Nothing here imports caictl.stages; the stage module (caictl.stages.ppo) holds the options and chooses the path."""
