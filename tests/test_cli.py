"""Every command has help and a place in the README; `caictl --help` stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer.main
from conftest import ROOT, caictl

from caictl.cli import app


def _commands(group=app, prefix=()) -> list[tuple[str, ...]]:
    click_group = typer.main.get_command(group)
    names = []
    for name, command in click_group.commands.items():
        names.append(prefix + (name,))
        if hasattr(command, "commands"):
            names += [prefix + (name, sub) for sub in command.commands]
    return names


COMMANDS = _commands()


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_and_is_in_the_readme(command):
    result = caictl(*command, "--help")
    assert "Usage" in result.stdout
    assert f"caictl {' '.join(command)}" in (ROOT / "README.md").read_text()


def test_help_imports_no_torch_or_transformers():
    code = "import sys; from caictl.cli import app; import caictl.stages.revise, caictl.engines; " \
           "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_version():
    from caictl import __version__

    assert caictl("--version").stdout.strip() == f"caictl {__version__}"
