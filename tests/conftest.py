"""Shared fixtures: the tiny random-weight model, paths to shared test data, and a CLI runner."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
EXAMPLES = ROOT / "examples"


def pytest_configure(config):
    """One clear line, instead of an import error per test module, when pytest runs outside caictl's venv."""
    missing = [name for name in ("caictl", "torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.exit(f"{', '.join(missing)} not installed for {sys.executable}: run `make test` (it sets up .venv/ "
                    "first), or `make setup llama-server && source .venv/bin/activate` and then `python -m pytest`",
                    returncode=4)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from caictl.stages import init_model as tiny

    return tiny.run(tiny.InitModelConfig(out=tmp_path_factory.mktemp("models") / "tiny", preset="tiny"))


@pytest.fixture(scope="session")
def tiny_pm(tmp_path_factory) -> Path:
    """A tiny random-weight preference model (sequence classification), shared and read-only."""
    from caictl.stages import init_model as tiny

    return tiny.run(tiny.InitModelConfig(out=tmp_path_factory.mktemp("models") / "pm", preset="tiny", task="seq-cls"))


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """family_model("qwen2.5" | "llama3" | "phi3"): a tiny random-weight model folder in that real family (its
    tokenizer and original chat template), built once per test run and shared by every test that asks; treat it
    as read-only. Needs the families' tokenizers prepared (`make setup`)."""
    from caictl.stages import init_model as tiny

    root, built = tmp_path_factory.mktemp("family-models"), {}

    def _build(name: str) -> Path:
        if name not in built:
            built[name] = tiny.run(tiny.InitModelConfig(out=root / name, preset="tiny", family=name))
        return built[name]

    return _build


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def engines_made(monkeypatch) -> list:
    """Every engine the stages under test open (through caictl.engines.generation), in order."""
    from caictl.engines import generation

    made = []
    real = generation.load_engine

    def noting(name, model, **options):
        made.append(real(name, model, **options))
        return made[-1]

    monkeypatch.setattr(generation, "load_engine", noting)
    return made


def caictl(*args, input: str | None = None, cwd=None, env: dict | None = None, check: bool = True):
    """Run the real command line in a subprocess; returns the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CAICTL_")}
    full_env.update(env or {})
    result = subprocess.run([sys.executable, "-m", "caictl", *map(str, args)], input=input, cwd=cwd,
                            env=full_env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"caictl {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr}")
    return result


def caictl_in_process(*args, env: dict | None = None) -> str:
    """Run the command line's own code in this process: the same argument parsing, caictl.yaml and environment
    reading, stage run() and error handling as `python -m caictl`, without a new interpreter (each pays seconds of
    torch and transformers import). For tests about what a stage makes; a test about the process itself (its exit
    status, stderr, stdin, signals, pipes) uses caictl(). env: variables to set (CAICTL_BASE_URL, say), after the
    test's own CAICTL_ ones are cleared, as caictl() does. Fails the test on a non-zero exit; returns what the command
    wrote to stdout."""
    from caictl import cli

    argv = ["caictl", *map(str, args)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CAICTL_")} | (env or {})
    stdout = io.StringIO()
    with mock.patch.object(sys, "argv", argv), mock.patch.dict(os.environ, clean, clear=True), \
            contextlib.redirect_stdout(stdout):
        try:
            cli.main()
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    if code != 0:
        raise AssertionError(f"caictl {' '.join(argv[1:])} exited {code} (in process; its stderr is above)")
    return stdout.getvalue()


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def sharpened_copy(model_dir: Path, folder: Path) -> Path:
    """A copy of a model in `folder` with its logits scaled up 8x (its final norm's weight): a random model's
    distribution is nearly flat, so a penalty or filter applied to it would rarely change which token is drawn."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(model_dir, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.mul_(8)
    model.save_pretrained(folder)
    return folder


def write_jsonl(path, rows) -> Path:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return Path(path)
