"""What a model folder holds, checked before a stage does any work with it.

transformers loads a preference model's folder as a causal LM (or the other way round) with a freshly
initialised head and only a warning, so a PM passed as --policy would train and exit 0. A stage calls
`check(model, expected, flag)` on each model it is given: a local folder of the other kind, one without
config.json, or one without weights stops with an error that names the folder, what it holds and what the flag
takes.

A value that is no folder here is a typo'd path far more often than a hub id, and the hub loader would spend a
minute retrying the network before it said anything. A path-like value (./x, x/y/z, ~/x, /x) stops at once with
"no such folder"; a valid hub id (owner/name) passes when it is cached or the hub answers one request (caictl.models
.hub), else stops after that one try. Stages call check() only for models the hf engine loads: a served model's
name is the server's business.

Folders that `caictl init-model` filled with random weights get one warning per process: their output is noise,
and a first run on one reads as a bug in caictl otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

from caictl.errors import UsageError
from caictl.models import hub
from caictl.ui import log

CAUSAL_LM, SEQ_CLS = "causal-lm", "seq-cls"
_WANTED = {
    CAUSAL_LM: "a causal language model (an ...ForCausalLM folder, such as `caictl init-model`, `caictl sft` or "
               "`caictl ppo` output)",
    SEQ_CLS: "a preference model (an ...ForSequenceClassification folder with a scalar head, such as "
             "`caictl train-pm` output)",
}
# How to make the folder a missing value names; {} is the value.
_MAKE = {
    CAUSAL_LM: "build one with `caictl init-model --out {}` (random weights, offline) or `caictl sft`",
    SEQ_CLS: "build one with `caictl train-pm --out {}` (or `caictl init-model --task seq-cls --out {}`, random "
             "weights)",
    None: "build one with `caictl init-model --out {}` (random weights, offline)",
}
_warned_random: set[Path] = set()


def kind_of(architectures: list[str]) -> str | None:
    """causal-lm, seq-cls, or None for an architecture that is neither (an encoder, say)."""
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return SEQ_CLS
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return CAUSAL_LM
    return None


def check(model: str | Path, expected: str, flag: str) -> None:
    path = Path(model)
    where = f"{flag}{model}" if flag.endswith("=") else f"{flag} {model}"  # "--model NAME=" in eval compare
    if not path.exists():
        _no_folder(str(model), where, expected)
        return
    if not path.is_dir():
        raise UsageError(f"{where}: a file, not a model folder")
    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        return  # a LoRA adapter alone: peft finds its base model
    if not (path / "config.json").exists():
        raise UsageError(f"{where}: not a model folder (no config.json); {flag} takes {_WANTED[expected]}")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UsageError(f"{where}: config.json is not valid JSON (a half-written folder?); write it again with "
                         "the stage that made it")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UsageError(f"{where}: no weight files (*.safetensors or *.bin): a half-written or unfinished folder; "
                         "write it again with the stage that made it")
    architectures = config.get("architectures") or []
    found = kind_of(architectures)
    if found is not None and found != expected:
        what = ("a sequence-classification (preference) model" if found == SEQ_CLS
                else "a causal language model")
        raise UsageError(f"{where} is {what} ({', '.join(architectures)}); {flag} takes {_WANTED[expected]}")
    warn_if_random(path)


def require(model: str | Path, flag: str) -> None:
    """check() for a flag that takes a model of any kind (a train-pm backbone, a tokenizer's source): the value
    is a folder here or a hub id that can load."""
    path = Path(model)
    if not path.exists():
        _no_folder(str(model), f"{flag} {model}", None)
        return
    warn_if_random(path)


def _no_folder(model: str, where: str, expected: str | None) -> None:
    """Return for a hub id that can load; raise for a path, or a hub id neither cached nor reachable."""
    make = _MAKE[expected].format(model, model)
    if not hub.is_hub_id(model):
        raise UsageError(f"{where}: no such folder{_tilde_hint(model)}; {make}, or give a hub id (owner/name)")
    why = hub.unavailable(model)
    if why is not None:
        raise UsageError(f"{where}: not a local folder{_siblings(model)}, not in the hub cache, and the hub could "
                         f"not be reached ({why}); if it is a folder, {make}; if a hub id, run once where the hub "
                         "can be reached, which caches it")


def _tilde_hint(model: str) -> str:
    # `--model=~/x` and caictl.yaml values reach caictl unexpanded; neither caictl nor transformers expands them.
    if model.startswith("~") and Path(model).expanduser().exists():
        return f" (~ is not expanded here: write {Path(model).expanduser()})"
    return ""


def _siblings(model: str) -> str:
    """For `models/qwen_tiny` where models/ is a folder here: what it does hold, since a typo is the likely cause."""
    parent = Path(model).parent
    if parent == Path(".") or not parent.is_dir():
        return ""
    names = sorted(p.name for p in parent.iterdir() if p.is_dir())
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f" ({parent}/ holds {shown})" if names else f" ({parent}/ is empty)"


def warn_if_random(path: Path) -> None:
    """One stderr line per model folder per process for a folder of random weights."""
    key = path.resolve()
    if key not in _warned_random and random_weights(path):
        _warned_random.add(key)
        log(f"warning: {path} has RANDOM weights (caictl init-model): what it generates or scores is noise")


def random_weights(path: str | Path) -> bool:
    """True for a folder whose caictl.json says `caictl init-model` made it with random weights (it never trained,
    so what it generates or scores is noise). Hub ids, missing folders and unreadable caictl.json read False."""
    info = Path(path) / "caictl.json"
    try:
        return json.loads(info.read_text(encoding="utf-8")).get("random_weights") is True
    except (OSError, ValueError, AttributeError):
        return False
