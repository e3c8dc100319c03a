"""Shared options: the flag, else the environment (CAICTL_MODEL, ...), else caictl.yaml in the working directory.

    # caictl.yaml
    model: models/tiny
    engine: hf
    base_url: [http://gpu1:8000/v1, http://gpu2:8000/v1]   # openai engine: one server, or a list of them
    constitution: harmless
    seed: 0
    max_retries: 6   # openai engine: retries of a failed request
    timeout: 120     # openai engine: seconds a request may take
    tokenizer: Qwen/Qwen2.5-7B-Instruct   # openai engine: the served model's tokenizer (token-id prompts)
    rounds: 2        # stage options: used by every stage that has the flag, ignored by the others
    max_new_tokens: 128
    batch_size: 8    # generating and scoring stages only
    temperature: 0.7

Stage options come from the flag, else caictl.yaml, else the stage config's default (no environment variable).
batch_size is rows per forward pass, a speed setting; the training stages (sft, train-pm, dpo, ppo) take theirs
from the flag only, because there it is an optimisation setting that a speed tweak must not change.
"""

from __future__ import annotations

import os
from pathlib import Path

from caictl.errors import UsageError

URL_EXAMPLE = "http://127.0.0.1:8000/v1"

SHARED = ("model", "engine", "base_url", "constitution", "seed", "max_retries", "timeout", "tokenizer")
# What a shared option must be, wherever it is set, so a wrong one stops the run with a line, not a traceback:
# (type, least value, what is expected). base_url is checked by _parse_urls.
SHARED_TYPES = {
    "model": (str, None, "a folder or hub id"),
    "engine": (str, None, "an engine name"),
    "seed": (int, None, "a whole number"),
    "tokenizer": (str, None, "a folder or hub id"),
}  # constitution is checked as it loads (a name, files, or a list of them); max_retries and timeout by the
#    openai engine, when it opens (caictl.engines.generation)
# Stage options caictl.yaml may set, each checked as its flag is: (type, least value, what is expected).
STAGE_OPTIONS = {
    "rounds": (int, 1, "a whole number, at least 1"),
    "max_new_tokens": (int, 1, "a whole number, at least 1"),
    "batch_size": (int, 1, "a whole number, at least 1"),
    "temperature": (float, 0, "a number, at least 0 (0 is greedy)"),
}
PROJECT_FILE = "caictl.yaml"

NO_MODEL = (
    "no model set: pass --model (a local folder or a hub id), set CAICTL_MODEL, or put `model: ...` in "
    "caictl.yaml. For an offline try, build a random-weight model first: "
    "caictl init-model --preset tiny --out models/tiny"
)


def resolve(name: str, flag_value=None, default=None):
    """The value of a shared option by precedence: flag, CAICTL_<NAME>, caictl.yaml, default. base_url's is the
    list of URLs (caictl.settings.base_urls), or `default` when none is set anywhere."""
    if name not in SHARED:
        raise KeyError(name)
    if name == "base_url":
        return base_urls(flag_value) or default
    if flag_value is not None:
        return flag_value
    env = os.environ.get(f"CAICTL_{name.upper()}")
    if env:
        return _from_env(name, env)
    project = _project_file()
    if project.get(name) is not None:
        return project[name]
    return default


def base_urls(flag_value=None) -> list[str]:
    """The openai engine's server URLs, by the precedence of every shared option: the flag (repeatable), else
    CAICTL_BASE_URL, else `base_url:` in caictl.yaml (a URL or a list of them). Any entry may hold several URLs,
    comma-separated. Empty when none is set anywhere; a bad entry stops the run, naming where it came from."""
    if flag_value is not None:
        value, where = flag_value, "--base-url"
    elif os.environ.get("CAICTL_BASE_URL"):
        value, where = os.environ["CAICTL_BASE_URL"], "CAICTL_BASE_URL"
    else:  # caictl.yaml's was checked when the file was read
        return _parse_urls(_project_file().get("base_url") or [])[0]
    urls, problems = _parse_urls(value)
    if problems:
        raise UsageError(f"{where}: {'; '.join(problems)}")
    return urls


def stage_option(name: str, flag_value=None, default=None):
    """The value of a stage option by precedence: flag, caictl.yaml, default (the stage config's)."""
    if name not in STAGE_OPTIONS:
        raise KeyError(name)
    if flag_value is not None:
        return flag_value
    project = _project_file()
    return project[name] if project.get(name) is not None else default


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
    known = SHARED + tuple(STAGE_OPTIONS)
    unknown = set(data) - set(known)
    if unknown:
        raise UsageError(f"{path.resolve()}: unknown option(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(known)}")
    # Checked when the file is read, whichever stage reads it, so a bad value never waits for the stage that uses it.
    problems = [f"{name}: {data[name]!r} is not {expected}"
                for name, (kind, least, expected) in {**SHARED_TYPES, **STAGE_OPTIONS}.items()
                if data.get(name) is not None and not _fits(data[name], kind, least)]
    if data.get("base_url") is not None:
        problems += [f"base_url: {problem}" for problem in _parse_urls(data["base_url"])[1]]
    if problems:
        raise UsageError(f"{path.resolve()}: {'; '.join(problems)}")
    return data


def _parse_urls(value) -> tuple[list[str], list[str]]:
    """(URLs, problems) of a base_url as given: a string of comma-separated URLs, or a list of such strings."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return [], [f"expected a URL or a list of URLs, e.g. {URL_EXAMPLE}"]
    urls, problems = [], []
    for item in value:
        if not isinstance(item, str):
            problems.append(f"{item!r} is not a URL")
            continue
        for part in item.split(","):
            url = part.strip()
            if not url:
                problems.append(f"an empty entry in {item!r} (URLs are separated by single commas)")
            elif not url.startswith(("http://", "https://")):
                problems.append(f"{url!r} is not an http:// or https:// URL, e.g. {URL_EXAMPLE}")
            elif url in urls:
                problems.append(f"{url} is listed twice")
            else:
                urls.append(url)
    return urls, problems


def _from_env(name: str, text: str):
    """CAICTL_<NAME>'s text as the option's type."""
    if name not in SHARED_TYPES:
        return text
    kind, least, expected = SHARED_TYPES[name]
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not _fits(value, kind, least):
        raise UsageError(f"CAICTL_{name.upper()}={text!r} is not {expected}: set it to one, or unset it")
    return value


def _fits(value, kind: type, least: float | None) -> bool:
    # YAML gives typed values: `true` is a bool (an int to Python), `"4"` a string; neither passes as a number.
    # A whole number passes as a float, as `--temperature 1` does.
    if kind is str:
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        return False
    return least is None or value >= least
