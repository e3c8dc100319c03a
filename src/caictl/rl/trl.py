"""`caictl ppo --algo rloo|grpo`: the same job through TRL's RLOOTrainer or GRPOTrainer, with the PM (or the judge)
as the reward function, scoring the same transcripts with its own tokenizer. Unlike caictl's own PPO it runs on
several processes: `torchrun --nproc_per_node N -m caictl ppo --algo grpo ...`, --batch-size the whole step's
completions, each process generating an equal share.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from caictl.models.processes import is_main, leave_process_group
from caictl.models.training import (
    console_args,
    per_process,
    precision,
    release_memory,
    save_model,
    trainer_progress,
    trl_device_args,
)
from caictl.rl.reward import heldout_reward, reward_model, truncated_key
from caictl.ui import quiet_transformers


def run_trl(config, train, heldout) -> dict:
    """Train (config: the ppo stage's PPOConfig), save the policy to config.out and measure the held-out reward on
    it; return the metrics, on the main process only ({} on the others)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from caictl.models.pm import conversation_text

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

    chosen = precision(config.pure_bf16, config.lora)
    args = TRLConfig(
        output_dir=str(Path(config.out) / "checkpoints"), max_steps=config.steps, learning_rate=config.learning_rate,
        per_device_train_batch_size=per_process(config.batch_size), num_generations=config.num_generations,
        max_completion_length=config.max_new_tokens, temperature=config.temperature, beta=config.kl_coef,
        seed=config.seed, logging_steps=1, save_strategy="steps", save_steps=config.save_every, save_total_limit=1,
        report_to="none", **trl_device_args(TRLConfig, chosen), **console_args(),
        # TRL loads the policy (and the reference, like it) from the folder in this dtype.
        model_init_kwargs={"dtype": chosen.load},
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
    trainer_progress(trainer, f"ppo --algo {config.algo}")
    out = Path(config.out)
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    seconds = time.perf_counter() - start
    # Each process scored its own share of the rollouts: the counts are summed over all of them.
    scored, cut_rollouts = trainer.accelerator.reduce(torch.tensor([scored, cuts.rows]), reduction="sum").tolist()
    save_model(trainer.model, tokenizer, out, merge=config.lora, trainer=trainer)
    leave_process_group()
    if not is_main():  # the main process measures the held-out reward and reports
        return {}

    logs = [e for e in trainer.state.log_history if "loss" in e]
    history = [{"step": e["step"], "reward_mean": e.get("reward"), "reward_std": e.get("reward_std"),
                "kl": e.get("kl"), "entropy": e.get("entropy"), "response_length": e.get("completions/mean_length"),
                "loss": e.get("loss")} for e in logs]
    steps = trainer.state.global_step
    # The held-out reward loads the folders: the trainer's models and optimizer state go first.
    del trainer
    release_memory()
    return {"algo": config.algo, "steps": steps, "heldout_prompts": len(heldout),
            "heldout_reward_before": heldout_reward(config.policy, heldout, scorer, config),
            "heldout_reward_after": heldout_reward(out, heldout, scorer, config),
            "kl": history[-1]["kl"] if history else None, "rollouts": scored, truncated_key(config): cut_rollouts,
            "seconds": round(seconds, 2), "seconds_per_step": round(seconds / max(steps, 1), 3), "history": history}
