"""What a model folder holds, checked before a stage does any work with it.

transformers loads a preference model's folder as a causal LM (or the other way round) with a freshly
initialised head and only a warning, so a PM passed as --policy would train and exit 0. A stage calls
`check(model, expected, flag)` on each model it is given: a local folder of the other kind, one without
config.json, or one without weights stops with an error that names the folder, what it holds and what the flag
takes. Hub ids and served model names are not folders here and pass through (their loader says what is wrong).
"""

from __future__ import annotations

import json
from pathlib import Path

from caictl.errors import UsageError

CAUSAL_LM, SEQ_CLS = "causal-lm", "seq-cls"
_WANTED = {
    CAUSAL_LM: "a causal language model (an ...ForCausalLM folder, such as `caictl init-model`, `caictl sft` or "
               "`caictl ppo` output)",
    SEQ_CLS: "a preference model (an ...ForSequenceClassification folder with a scalar head, such as "
             "`caictl train-pm` output)",
}


def kind_of(architectures: list[str]) -> str | None:
    """causal-lm, seq-cls, or None for an architecture that is neither (an encoder, say)."""
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return SEQ_CLS
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return CAUSAL_LM
    return None


def check(model: str | Path, expected: str, flag: str) -> None:
    path = Path(model)
    if not path.exists():
        return
    where = f"{flag}{model}" if flag.endswith("=") else f"{flag} {model}"  # "--model NAME=" in eval compare
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
