"""Every command has help and a place in the README; `caictl --help` stays light."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import MISSING
from pathlib import Path

import pytest
import typer.main
from conftest import ROOT, caictl, write_jsonl
from typer.testing import CliRunner

from caictl.cli import COMMANDS as COMMAND_TABLE
from caictl.cli import GROUPS, app, build


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


def test_the_readme_lists_every_command_s_python_api_and_its_names_import():
    # The "Layout and the Python API" section: one row per command, its module and config as they are.
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout and the Python API"):readme.index("## Development")]
    for name, module in COMMAND_TABLE.items():
        row = f"| `caictl {name}` | `{module.__name__}` | `{build.config_class_of(module).__name__}` |"
        assert row in section, row
    # Every dotted name it shows people import, importable (a module, or a name in one).
    import importlib
    import re

    for dotted in set(re.findall(r"`(caictl(?:\.\w+)+)`", section)) - {"caictl.json", "caictl.yaml"}:  # files
        try:
            importlib.import_module(dotted)
        except ImportError:
            parent, _, attribute = dotted.rpartition(".")
            assert hasattr(importlib.import_module(parent), attribute), dotted


def test_help_imports_no_torch_or_transformers():
    code = "import sys; from caictl.cli import app; import caictl.stages.revise, caictl.engines; " \
           "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_version():
    from caictl import __version__

    assert caictl("--version").stdout.strip() == f"caictl {__version__}"


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    # More than a pipe holds (64 KiB, at most 1 MiB), so the command is still writing when its reader goes.
    revisions = write_jsonl(tmp_path / "revisions.jsonl", [
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"Question {i}?"}], "initial_response": "No. " * 50,
         "steps": [], "response": f"A careful answer {i}. " * 15} for i in range(4000)])
    env = {name: value for name, value in os.environ.items() if not name.startswith("CAICTL_")}
    command = subprocess.Popen([sys.executable, "-m", "caictl", "sample", "--from-revisions", str(revisions)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = command.stdout.readline()
    command.stdout.close()  # what `| head -1` does
    stderr = command.stderr.read().decode()
    # 141: a shell's status for a writer ended by SIGPIPE, as `yes | head -1` reports it.
    assert command.wait(timeout=300) == 141, stderr
    assert json.loads(first)["id"] == "r0"
    assert "Traceback" not in stderr and "error" not in stderr.lower(), stderr


# Each command of the table, run with only its required fields given (a sample value of each one's type), must
# hand its stage the config built in code from those fields alone.
SAMPLE_VALUES = {str: "x", int: "0", float: "0.5", Path: "x", list[str]: "x.jsonl"}


def _required(command: str) -> tuple[list[str], dict]:
    """(argv, config fields) of a command's required flags and arguments."""
    argv, given = [], {}
    for flag in build.flags_of(build.config_class_of(COMMAND_TABLE[command])):
        if flag.required:
            text = SAMPLE_VALUES[flag.kind]
            argv += [text] if flag.meta.get("argument") else [flag.decls[0], text]
            given[flag.name] = [text] if flag.kind == list[str] else flag.kind(text)
        elif flag.default is MISSING:  # no default, but None will do (ppo's --pm): the command gives None
            given[flag.name] = None
    return argv, given


def _config_class(command: str):
    return build.config_class_of(COMMAND_TABLE[command])


def test_every_command_of_the_table_is_on_the_command_line():
    leaves = {" ".join(command) for command in COMMANDS if len(command) > 1 or command[0] not in GROUPS}
    assert leaves == set(COMMAND_TABLE)


@pytest.mark.parametrize("command", list(COMMAND_TABLE))
def test_command_defaults_are_the_configs_defaults(command, monkeypatch, tmp_path):
    # No caictl.yaml in tmp_path: every option is the config's default.
    expected = _config_class(command)(**_required(command)[1])
    assert _config_seen(command, [], monkeypatch, tmp_path, None) == expected


# caictl.yaml may set these stage options: each stage that has the flag takes the value, the others ignore it.
YAML_OPTIONS = {"rounds": 3, "max_new_tokens": 7, "batch_size": 5, "temperature": 0.25}
TRAINING_COMMANDS = {"sft", "train-pm", "dpo", "ppo"}


def _config_seen(command, arguments, monkeypatch, tmp_path, project: dict | None, env: dict | None = None):
    """The config a command hands its stage, run in tmp_path with `project` as caictl.yaml."""
    seen = []
    monkeypatch.setattr(COMMAND_TABLE[command], "run", lambda config, *rest: seen.append(config) or {"report": "r"})
    for name in [n for n in os.environ if n.startswith("CAICTL_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    if project is not None:
        (tmp_path / "caictl.yaml").write_text(json.dumps(project))  # JSON is YAML
    result = CliRunner().invoke(app, [*command.split(), *_required(command)[0], *arguments])
    assert result.exit_code == 0, result.output
    return seen[0]


@pytest.mark.parametrize("command", list(COMMAND_TABLE))
def test_caictl_yaml_sets_the_stage_options_of_every_stage_that_has_the_flag(command, monkeypatch, tmp_path):
    defaults = _config_class(command)(**_required(command)[1])
    taken = {name: value for name, value in YAML_OPTIONS.items() if hasattr(defaults, name)}
    if command in TRAINING_COMMANDS:
        del taken["batch_size"]  # an optimisation setting there: the flag only
    # Each value differs from every stage's default, so a stage that ignored caictl.yaml would show.
    assert all(getattr(defaults, name) != value for name, value in taken.items())
    assert _config_seen(command, [], monkeypatch, tmp_path, YAML_OPTIONS) == dataclasses.replace(defaults, **taken)


@pytest.mark.parametrize("name, flag", [("rounds", "2"), ("max_new_tokens", "9"), ("batch_size", "1"),
                                        ("temperature", "0")])
def test_a_flag_wins_over_caictl_yaml(name, flag, monkeypatch, tmp_path):
    config = _config_seen("revise", [f"--{name.replace('_', '-')}", flag], monkeypatch, tmp_path, YAML_OPTIONS)
    assert getattr(config, name) == type(YAML_OPTIONS[name])(flag)
    others = {k: v for k, v in YAML_OPTIONS.items() if k != name}
    assert {k: getattr(config, k) for k in others} == others


@pytest.mark.parametrize("line, expected", [
    ("rounds: 0", "rounds: 0 is not a whole number, at least 1"),
    ("max_new_tokens: 2.5", "max_new_tokens: 2.5 is not a whole number, at least 1"),
    ("batch_size: '8'", "batch_size: '8' is not a whole number, at least 1"),
    ("rounds: true", "rounds: True is not a whole number, at least 1"),
    ("temperature: -0.5", "temperature: -0.5 is not a number, at least 0"),
])
def test_a_bad_stage_option_in_caictl_yaml_is_a_usage_error_that_names_the_file_and_key(line, expected, tmp_path):
    (tmp_path / "caictl.yaml").write_text(f"{line}\n")
    # sample has no --rounds: a bad value is refused by every stage that reads the file, not only by those that
    # use it. No model is needed: the error comes before any loads.
    for command in (["revise"], ["sample"]):
        result = caictl(*command, cwd=tmp_path, check=False)
        assert result.returncode == 2, result.stderr
        assert f"caictl.yaml: {expected}" in result.stderr and "Traceback" not in result.stderr


def test_an_unknown_key_in_caictl_yaml_is_still_refused(tmp_path):
    (tmp_path / "caictl.yaml").write_text("round: 2\n")
    result = caictl("revise", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "unknown option(s) round;" in result.stderr and "rounds" in result.stderr


def _click_command(path: tuple[str, ...]):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def _help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_at_80_columns_shows_every_option_whole(command):
    text = _help(command)
    # Every line, the examples from the stage's docstring included: a pipe into less shows them as they are.
    assert [line for line in text.splitlines() if len(line) > 80] == []
    options = text[text.index("\n\n", text.index("Usage:")):]
    names = [name for param in _click_command(command).params if param.param_type_name == "option"
             for name in (*param.opts, *param.secondary_opts)]
    words = set(options.replace(",", " ").replace("/", " ").split())
    assert [name for name in names if name not in words] == []
    assert "<bool>" not in text and "<list[str]>" not in text and "<str>" not in text


def test_help_groups_options_under_panels_in_order():
    headers = [line[:-1] for line in _help(("sft",)).splitlines() if line.endswith(":") and not line[0].isspace()]
    assert headers == ["Arguments", "Input and output", "Model and engine", "Training", "LoRA", "Resume and runs",
                       "Other"]
    revise = _help(("revise",))
    assert all(f"\n{panel}:\n" in revise for panel in ("Servers", "Sampling", "Method"))


def test_help_shows_square_brackets():
    assert "pip install 'caictl[encoders]'" in " ".join(_help(("train-pm",)).split())
    assert "[LO, HI]" in _help(("label",))


def test_score_help_has_no_limit():
    assert "--limit" not in _help(("score",)) and "--shard" in _help(("score",))


def test_clamp_takes_two_numbers_and_names_the_form(monkeypatch, tmp_path):
    assert _config_seen("label", ["--clamp", "0.3", "0.7"], monkeypatch, tmp_path, None).clamp == (0.3, 0.7)
    for wrong in (["--clamp", "0.4,0.6"], ["--clamp", "0.4", "--cot"], ["--clamp", "0.4"], ["--clamp", "0.4", "x"]):
        result = CliRunner().invoke(app, ["label", *wrong])
        assert result.exit_code == 2 and "--clamp LO HI" in result.output, result.output


@pytest.mark.parametrize("arguments, named", [(["--rounds", "2", "--rounds", "3"], "--rounds"),
                                              (["--limit=1", "--limit", "2"], "--limit"),
                                              (["-o", "a.jsonl", "--out", "b.jsonl"], "--out")])
def test_a_single_value_option_given_twice_is_refused(arguments, named):
    result = CliRunner().invoke(app, ["revise", *arguments])
    assert result.exit_code == 2 and f"'{named}'" in result.output and "given twice" in result.output


def test_a_switch_given_twice_takes_the_last(monkeypatch, tmp_path):
    # How a script overrides a choice made earlier on its command line.
    assert _config_seen("revise", ["--no-few-shot", "--few-shot"], monkeypatch, tmp_path, None).few_shot is True
    assert _config_seen("revise", ["--few-shot", "--no-few-shot"], monkeypatch, tmp_path, None).few_shot is False


def test_a_repeatable_option_may_be_given_twice(monkeypatch, tmp_path):
    config = _config_seen("eval compare", ["--model", "a=m1", "--model", "b=m2"], monkeypatch, tmp_path, None)
    assert config.models == ["a=m1", "b=m2"]


def test_a_shared_option_of_the_wrong_type_is_a_usage_error(tmp_path):
    result = caictl("label", env={"CAICTL_SEED": "abc"}, cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "caictl: error: CAICTL_SEED='abc' is not a whole number: set it to one, or unset it"]
    (tmp_path / "caictl.yaml").write_text("seed: abc\n")
    result = caictl("label", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "caictl.yaml: seed: 'abc' is not a whole number" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_shared_option_from_the_environment_is_typed(monkeypatch, tmp_path):
    config = _config_seen("label", [], monkeypatch, tmp_path, None, env={"CAICTL_SEED": "7", "CAICTL_MODEL": "m"})
    assert config.seed == 7 and config.model == "m"


def test_the_resolved_options_are_printed_at_start(monkeypatch, tmp_path):
    monkeypatch.setattr(COMMAND_TABLE["revise"], "run", lambda config: None)
    monkeypatch.chdir(tmp_path)
    quiet = CliRunner().invoke(app, ["revise", "--rounds", "2", "--model", "m"])
    assert quiet.exit_code == 0 and quiet.stderr == ""  # stderr is the stage's own: progress, warnings, summary
    full = CliRunner().invoke(app, ["-v", "revise", "--rounds", "2", "--model", "m"])
    lines = full.stderr.splitlines()
    assert full.exit_code == 0 and lines[0] == "caictl revise"
    assert {"  rounds = 2", "  model = m", "  temperature = 1.0", "  seed = 0"} <= set(lines)
