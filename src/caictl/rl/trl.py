"""`caictl ppo --algo rloo|grpo`: the same job through TRL's RLOOTrainer or GRPOTrainer, with the PM (or the judge)
as the reward function, scoring the same transcripts with its own tokenizer. Unlike caictl's own PPO it runs on
several processes: `torchrun --nproc_per_node N -m caictl ppo --algo grpo ...`, --batch-size the whole step's
completions, each process generating an equal share.

Two methods of TRL's trainers are replaced (content_as_data): prompts are tokenized with their content as data, as
caictl's own PPO rollout tokenizes them (a "<|im_end|>" in a prompt is text, not a turn the user closes), and
rollouts are sampled from the distribution the losses score, with nothing of the model's generation_config but
its stop ids. The completions' loss mask is TRL's: each completion up to and including its first stop id, which
is sft's rule (the answer and the end-of-turn token that closes it).
"""

from __future__ import annotations

import contextlib
import functools
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

    from caictl.models.pm import conversation_text

    quiet_transformers()
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

    pm_reward.__name__ = config.reward  # TRL logs each reward function by name
    trainer = prepare(config, [pm_reward], [p.messages for p in train])
    trainer_progress(trainer, f"ppo --algo {config.algo}")
    out = Path(config.out)
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    seconds = time.perf_counter() - start
    # Each process scored its own share of the rollouts: the counts are summed over all of them.
    scored, cut_rollouts = trainer.accelerator.reduce(torch.tensor([scored, cuts.rows]), reduction="sum").tolist()
    save_model(trainer.model, trainer.processing_class, out, merge=config.lora, trainer=trainer)
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


def prepare(config, reward_funcs: list, prompts: list[list[dict]]):
    """TRL's trainer for config.algo (caictl's subclass of it, content_as_data) on the prompts (messages), ready to
    train."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    if config.algo == "grpo":
        from trl import GRPOConfig as TRLConfig
        from trl import GRPOTrainer as TRLTrainer
    else:
        from trl import RLOOConfig as TRLConfig
        from trl import RLOOTrainer as TRLTrainer
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
    # TRL reloads the reference from the policy's folder (model.config._name_or_path): pass the path.
    return content_as_data(TRLTrainer)(
        model=config.policy, reward_funcs=reward_funcs, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"prompt": messages} for messages in prompts]), peft_config=peft_config)


@functools.cache
def content_as_data(base):
    """TRL's RLOOTrainer or GRPOTrainer (base), its prompts' content read as data and its rollouts sampled as caictl
    records them. TRL 1.16 has no hook for either: it tokenizes prompts with apply_chat_template(tokenize=True), which
    parses control tokens anywhere, and builds its GenerationConfig leaving min_p, suppress_tokens and the like unset,
    which transformers then fills from the model's generation_config. A subclass rather than a tokenizer wrapper: TRL
    requires a real tokenizer (it pads, decodes and saves with it), and these two methods are where prompts become
    ids and ids are sampled. tests/test_trl_content.py fails if TRL changes their signatures or stops calling them."""
    from trl.data_utils import is_conversational

    from caictl.data.control_text import ContentEncoder, mark
    from caictl.engines.base import only_stop_ids

    class ContentTrainer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # eos_token_ids: every id a completion ends at, which content may not produce either.
            self.content_encoder = ContentEncoder(self._tokenizer, self.eos_token_ids)

        def _tokenize_prompts(self, prompts: list):
            """(prompt ids, images, multimodal fields), as TRL's own returns them; caictl's prompts are text."""
            if is_conversational({"prompt": prompts[0]}):
                ids = self.content_encoder.encode_chats(prompts, add_generation_prompt=True,
                                                        **self.chat_template_kwargs)
            else:
                ids = self.content_encoder.encode([mark(prompt) for prompt in prompts])
            return ids, None, {}

        def _generate_single_turn(self, *args, **kwargs):
            # TRL's GenerationConfig is filled from the model's where it leaves a field unset; only_stop_ids leaves
            # the model's stop ids alone in it while TRL generates (caictl's PPO rollout samples the same way).
            with only_stop_ids(self.accelerator.unwrap_model(self.model)):
                return super()._generate_single_turn(*args, **kwargs)

    ContentTrainer.__name__ = ContentTrainer.__qualname__ = f"Content{base.__name__}"
    return ContentTrainer
