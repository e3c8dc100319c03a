"""Shared options: the flag, else the environment (CAICTL_MODEL, ...), else caictl.yaml in the working directory.

    # caictl.yaml
    model: models/tiny
    engine: hf
    constitution: harmless
    seed: 0
    max_retries: 6   # openai engine: retries of a failed request
    timeout: 120     # openai engine: seconds a request may take
"""

from __future__ import annotations

import os
from pathlib import Path

from caictl.errors import UsageError

SHARED = ("model", "engine", "base_url", "constitution", "seed", "max_retries", "timeout")
PROJECT_FILE = "caictl.yaml"

NO_MODEL = (
    "no model set: pass --model (a local folder or a hub id), set CAICTL_MODEL, or put `model: ...` in "
    "caictl.yaml. For an offline try, build a random-weight model first: "
    "caictl init-model --preset tiny --out models/tiny"
)


def resolve(name: str, flag_value=None, default=None):
    """The value of a shared option by precedence: flag, CAICTL_<NAME>, caictl.yaml, default."""
    if name not in SHARED:
        raise KeyError(name)
    if flag_value is not None:
        return flag_value
    env = os.environ.get(f"CAICTL_{name.upper()}")
    if env:
        return env
    project = _project_file()
    if project.get(name) is not None:
        return project[name]
    return default


def require_model(flag_value: str | None) -> str:
    model = resolve("model", flag_value)
    if not model:
        raise UsageError(NO_MODEL)
    return str(model)


def _project_file() -> dict:
    path = Path(PROJECT_FILE)
    if not path.exists():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise UsageError(f"{path.resolve()}: invalid YAML ({error})")
    if not isinstance(data, dict):
        raise UsageError(f"{path.resolve()}: expected a mapping of option: value")
    unknown = set(data) - set(SHARED)
    if unknown:
        raise UsageError(f"{path.resolve()}: unknown option(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(SHARED)}")
    return data
