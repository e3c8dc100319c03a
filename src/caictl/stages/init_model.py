"""Offline demo and test models: random weights, a tokenizer trained here or a real family's.

    caictl init-model --preset tiny --out models/tiny
    caictl init-model --preset small --out models/small
    caictl init-model --preset tiny --task seq-cls --out models/tiny-pm
    caictl init-model --family llama3 --preset tiny --out models/llama3-tiny

No weights can be downloaded on an offline machine, so caictl builds its own: a Llama-shaped model with
random weights and a byte-level BPE tokenizer trained on caictl's own constitution text, in ChatML. These models
generate noise; they exist so that every stage runs end to end without a hub. `caictl.json` in the folder says so.

With `--family` (qwen2.5, llama3, phi3) the model is that family's architecture, scaled down but with the full
vocabulary, and the folder holds the family's real tokenizer and TRL's copy of its chat template (`caictl
families prepare` first). The weights are still random. The builders are in caictl.models.builders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from caictl.errors import UsageError
from caictl.models import families
from caictl.models.builders import FAMILY_PRESETS, PRESETS, TASKS, build_family, build_own
from caictl.models.training import write_model_info
from caictl.options import INPUT_OUTPUT, MODEL_ENGINE, RUNS, option


@dataclass
class InitModelConfig:
    out: Path = option(help="Folder to write the model to.", panel=INPUT_OUTPUT, short="-o")
    preset: str = option("tiny", "tiny (~0.1M parameters, tests), small (~25M, demo) or qwen0.5b-shape (~494M, GPU "
                                 "benchmarks).", MODEL_ENGINE)
    task: str = option("causal-lm", "causal-lm (a policy) or seq-cls (a scalar-head preference model).",
                       MODEL_ENGINE)
    seed: int = option(0, "Weights are a function of the seed.", RUNS)
    family: str | None = option(None, "qwen2.5, llama3 or phi3: that family's architecture (scaled down), real "
                                      "tokenizer and chat template; --preset tiny or small. Prepare once: caictl "
                                      "families prepare. Unset: caictl's own.", MODEL_ENGINE)

    def check(self) -> None:
        problems = []
        if self.preset not in PRESETS:
            problems.append(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        elif self.family is not None and self.preset not in FAMILY_PRESETS:
            problems.append(f"--family builds presets {' or '.join(FAMILY_PRESETS)}, not {self.preset!r}")
        if self.task not in TASKS:
            problems.append(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.family is not None and self.family not in families.MODEL_FAMILIES:
            known = f"; choose one of {', '.join(families.MODEL_FAMILIES)}"
            problems.append(f"{self.family} is a tokenizer-level family, with no model{known}"
                            if self.family in families.FAMILIES else f"unknown family {self.family!r}{known}")
        if problems:
            raise UsageError("; ".join(problems))
        if self.family is not None:
            families.require_prepared(self.family)


def run(config: InitModelConfig) -> Path:
    """Build the model folder and return its path."""
    config.check()
    if config.family is None:
        model, tokenizer, extra = build_own(config.preset, config.task, config.seed)
    else:
        model, tokenizer, extra = build_family(config.family, config.preset, config.task, config.seed)
    return _save(config, model, tokenizer, extra)


def _save(config: InitModelConfig, model, tokenizer, extra: dict) -> Path:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    write_model_info(out, "init-model", {
        "random_weights": True,
        "warning": "RANDOM WEIGHTS: this model was never trained and generates noise. "
        "It exists so that caictl runs and tests offline.",
        "preset": config.preset,
        "task": config.task,
        "seed": config.seed,
        "parameters": n_params,
        **extra,
    }, processes=False)
    return out

