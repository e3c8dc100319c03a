"""The command line: one table of commands, each built from its stage module (caictl.cli.build).

A command's help is its stage module's docstring: the first paragraph and the examples under it. Stage modules
are light at import (torch and transformers load inside run()), so `caictl --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from caictl import __version__, ui
from caictl.cli.build import add_command
from caictl.errors import CaictlError

# Command -> stage module: `train-pm` is caictl.stages.train_pm, `eval mc` caictl.stages.eval_mc (one name per
# thing). Each module holds one config dataclass, whose fields declare the flags, and run(config).
COMMANDS = {name: importlib.import_module("caictl.stages." + name.replace("-", "_").replace(" ", "_")) for name in (
    "init-model", "revise", "sample", "label", "train-pm", "score", "serve-pm", "inspect", "ppo", "dpo", "sft",
    "eval mc", "eval pm", "eval compare", "eval report", "eval labeler", "eval iterations",
    "constitution show", "constitution validate", "constitution convert", "constitution diff",
    "families prepare", "families status", "prompts import", "prompts generate", "prompts dedupe",
)}
GROUPS = {
    "eval": "Evaluate models and preference models.",
    "constitution": "Show, validate, convert and compare constitutions.",
    "families": "Real model families' tokenizers, for init-model --family.",
    "prompts": "Red-team prompts: import, generate few-shot, dedupe and decontaminate.",
}
# What a command prints on stdout, for scripts to read: the path it made. The others write files or records.
SHOWN = {"init-model": str, "eval report": lambda summary: summary["report"]}


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
    rich_markup_mode=None,  # plain Click help: see caictl.cli.build.StageCommand.format_options
)
groups = {name: typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None) for name, help in GROUPS.items()}
for group_name, group in groups.items():
    app.add_typer(group, name=group_name)
for command_name, module in COMMANDS.items():
    parent = groups[command_name.split()[0]] if " " in command_name else app
    add_command(parent, command_name, module, SHOWN.get(command_name))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"caictl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print every resolved option at start, and the "
                                          "libraries' own progress and load reports.")] = False,
) -> None:
    ui.set_verbose(verbose)


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
