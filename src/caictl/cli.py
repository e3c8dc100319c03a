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
    preset: Annotated[str, typer.Option(help="tiny (~0.1M parameters, tests) or small (~25M, demo).")] = "tiny",
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
        concurrency=concurrency, seed=int(settings.resolve("seed", seed, 0)), limit=limit, format=format,
        skip_invalid=skip_invalid, overwrite=overwrite,
    ))


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
