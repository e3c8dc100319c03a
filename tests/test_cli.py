"""Every command has help and a place in the README; `caictl --help` stays light."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from conftest import ROOT, caictl, write_jsonl
from typer.testing import CliRunner

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


# What each command hands its stage when only the required arguments are given: (module, run function,
# config class, arguments, the config's required fields). The constitution commands take no config.
DEFAULTS_CASES = {
    ("init-model",): ("init_model", "run", "InitModelConfig", ["--out", "m"], {"out": "m"}),
    ("revise",): ("revise", "run", "ReviseConfig", [], {}),
    ("sample",): ("sample", "run", "SampleConfig", [], {}),
    ("label",): ("label", "run", "LabelConfig", [], {}),
    ("train-pm",): ("train_pm", "run", "TrainPMConfig", ["p.jsonl", "-o", "pm"], {"prefs": ["p.jsonl"], "out": "pm"}),
    ("score",): ("score", "run", "ScoreConfig", ["--pm", "pm"], {"pm": "pm"}),
    ("serve-pm",): ("serve_pm", "run", "ServePMConfig", ["--pm", "pm", "--port", "0"], {"pm": "pm", "port": 0}),
    ("ppo",): ("ppo", "run", "PPOConfig", ["--policy", "a", "--pm", "b", "-o", "c"],
               {"prompts": None, "policy": "a", "pm": "b", "out": "c"}),
    ("dpo",): ("dpo", "run", "DPOConfig", ["p.jsonl", "-o", "d"], {"prefs": ["p.jsonl"], "out": "d"}),
    ("sft",): ("sft", "run", "SFTConfig", ["r.jsonl", "-o", "s"], {"revisions": ["r.jsonl"], "out": "s"}),
    ("eval", "mc"): ("eval_mc", "run", "EvalMCConfig", ["q.jsonl", "-o", "e"], {"files": ["q.jsonl"], "out": "e"}),
    ("eval", "pm"): ("eval_pm", "run", "EvalPMConfig", ["c.jsonl", "--pm", "pm", "-o", "e"],
                     {"files": ["c.jsonl"], "pm": "pm", "out": "e"}),
    ("eval", "compare"): ("eval_compare", "run", "EvalCompareConfig", ["h.jsonl", "-o", "e"],
                          {"prompts": ["h.jsonl"], "out": "e"}),
    ("inspect",): ("inspect", "run", "InspectConfig", ["f.jsonl"], {"file": "f.jsonl"}),
    ("eval", "report"): ("eval_report", "run", "EvalReportConfig", ["runs/x"], {"paths": ["runs/x"]}),
    ("eval", "labeler"): ("eval_labeler", "run", "EvalLabelerConfig", ["c.jsonl", "-o", "e"],
                          {"files": ["c.jsonl"], "out": "e"}),
    ("eval", "iterations"): ("eval_iterations", "run", "EvalIterationsConfig",
                             ["runs/x", "--prompts", "h.jsonl", "--reference", "m", "-o", "e"],
                             {"run": "runs/x", "prompts": "h.jsonl", "reference": "m", "out": "e"}),
    ("constitution", "diff"): ("constitution_diff", "run", "ConstitutionDiffConfig", ["a", "b", "p.jsonl", "-o", "d"],
                               {"a": "a", "b": "b", "pairs": "p.jsonl", "out": "d"}),
}
WITHOUT_CONFIG = {("constitution",), ("constitution", "show"), ("constitution", "validate"),
                  ("constitution", "convert"), ("eval",)}


def test_every_command_is_checked_for_its_defaults():
    assert set(COMMANDS) == set(DEFAULTS_CASES) | WITHOUT_CONFIG


@pytest.mark.parametrize("command", list(DEFAULTS_CASES), ids=" ".join)
def test_command_defaults_are_the_configs_defaults(command, monkeypatch, tmp_path):
    module_name, _, config_name, _, required = DEFAULTS_CASES[command]
    module = importlib.import_module(f"caictl.stages.{module_name}")
    if module_name == "init_model":
        required = {**required, "out": Path(required["out"])}
    # No caictl.yaml in tmp_path: every option is the config's default.
    assert _config_seen(command, [], monkeypatch, tmp_path, None) == getattr(module, config_name)(**required)


# caictl.yaml may set these stage options: each stage that has the flag takes the value, the others ignore it.
YAML_OPTIONS = {"rounds": 3, "max_new_tokens": 7, "batch_size": 5, "temperature": 0.25}
TRAINING_COMMANDS = {"sft", "train-pm", "dpo", "ppo"}


def _config_seen(command, arguments, monkeypatch, tmp_path, project: dict | None):
    """The config a command hands its stage, run in tmp_path with `project` as caictl.yaml."""
    module_name, function, _, required_arguments, _ = DEFAULTS_CASES[command]
    module = importlib.import_module(f"caictl.stages.{module_name}")
    seen = []
    monkeypatch.setattr(module, function, lambda config, *rest: seen.append(config) or {"report": "r"})
    for name in [n for n in os.environ if n.startswith("CAICTL_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    if project is not None:
        (tmp_path / "caictl.yaml").write_text(json.dumps(project))  # JSON is YAML
    result = CliRunner().invoke(app, [*command, *required_arguments, *arguments])
    assert result.exit_code == 0, result.output
    return seen[0]


@pytest.mark.parametrize("command", list(DEFAULTS_CASES), ids=" ".join)
def test_caictl_yaml_sets_the_stage_options_of_every_stage_that_has_the_flag(command, monkeypatch, tmp_path):
    module_name, _, config_name, _, required = DEFAULTS_CASES[command]
    module = importlib.import_module(f"caictl.stages.{module_name}")
    if module_name == "init_model":
        required = {**required, "out": Path(required["out"])}
    defaults = getattr(module, config_name)(**required)
    taken = {name: value for name, value in YAML_OPTIONS.items() if hasattr(defaults, name)}
    if command[0] in TRAINING_COMMANDS:
        del taken["batch_size"]  # an optimisation setting there: the flag only
    # Each value differs from every stage's default, so a stage that ignored caictl.yaml would show.
    assert all(getattr(defaults, name) != value for name, value in taken.items())
    assert _config_seen(command, [], monkeypatch, tmp_path, YAML_OPTIONS) == dataclasses.replace(defaults, **taken)


@pytest.mark.parametrize("name, flag", [("rounds", "2"), ("max_new_tokens", "9"), ("batch_size", "1"),
                                        ("temperature", "0")])
def test_a_flag_wins_over_caictl_yaml(name, flag, monkeypatch, tmp_path):
    config = _config_seen(("revise",), [f"--{name.replace('_', '-')}", flag], monkeypatch, tmp_path, YAML_OPTIONS)
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
