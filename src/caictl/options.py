"""A stage option declared once: its meaning, help panel and flag sit beside the config field that holds it.

    rounds: int = option(4, "Critique -> revision rounds per prompt (paper: 4).", METHOD)

The CLI builds every command from these fields (flag, help, panel, default), so a default or a meaning is never
written twice. The stage dataclass stays the one place that says what a field means.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, field

# Help panels, in the order `--help` shows them.
INPUT_OUTPUT = "Input and output"
MODEL_ENGINE = "Model and engine"
SERVERS = "Servers"
SAMPLING = "Sampling"
METHOD = "Method"
TRAINING = "Training"
LORA = "LoRA"
RUNS = "Resume and runs"
PANELS = (INPUT_OUTPUT, MODEL_ENGINE, SERVERS, SAMPLING, METHOD, TRAINING, LORA, RUNS)


# What `cli` may hold, read by caictl.cli only. Anything else is a typo that would silently change a flag.
CLI_KEYS = {
    "flag",  # the declaration when it is not --field-name (bools: --x/--no-x), e.g. "--soft/--hard", "--pairs"
    "short",  # a one-letter alias, "-o"
    "argument",  # True: positional; a list-typed field takes several
    "invert",  # True: the flag's first form means False (hard <- "--soft/--hard")
    "settings",  # "shared": flag, CAICTL_<NAME>, caictl.yaml, default; "stage": flag, caictl.yaml, default
    "metavar",  # the value's form in --help: "LO HI", "K/N", "FILE[:WEIGHT]"
    "split",  # "," : one flag value holding a list, comma-separated
    "repeat",  # True: a list option given once per item
    "required",  # True: the flag must be given although the dataclass keeps a default
    "cli",  # False: no flag
}
SETTINGS = ("shared", "stage")


def option(default=MISSING, help: str = "", panel: str = METHOD, *, default_factory=MISSING, **cli) -> Field:
    """A config field with its command-line help. `cli` holds what the flag needs beyond the field's name and
    type (CLI_KEYS)."""
    if panel not in PANELS:
        raise ValueError(f"unknown help panel {panel!r}; one of {PANELS}")
    if unknown := set(cli) - CLI_KEYS:
        raise ValueError(f"unknown option metadata {sorted(unknown)}; known: {sorted(CLI_KEYS)}")
    if cli.get("settings", SETTINGS[0]) not in SETTINGS:
        raise ValueError(f"settings={cli['settings']!r}: one of {SETTINGS}")
    metadata = {"help": help, "panel": panel, **cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def declaration(name: str, metadata, switch: bool) -> str:
    """A field's flag as Click declares it: "--x", a switch's "--x/--no-x", or the `flag` its metadata names."""
    dashed = name.replace("_", "-")
    return metadata.get("flag") or (f"--{dashed}/--no-{dashed}" if switch else f"--{dashed}")


# Options many stages share, meaning the same in each: their help is written here once, their default stays
# on the stage's dataclass line.
COMMON = {
    "model": ("Model folder or hub id (hf engine), or the server's model name (openai).", MODEL_ENGINE,
              {"settings": "shared"}),
    "engine": ("hf (in-process) or openai (a server).", MODEL_ENGINE, {"settings": "shared"}),
    "compile": ("hf engine: decoding steps through torch.compile over a static KV cache; unset: on with a CUDA "
                "GPU, off on a CPU (where compiling takes longer than it saves).", MODEL_ENGINE,
                {"flag": "--compile/--no-compile"}),
    "base_url": ("openai engine: an OpenAI-compatible server URL; repeat (or comma-separate) for several "
                 "servers, each request going to the least busy.", SERVERS,
                 {"settings": "shared", "repeat": True, "metavar": "URL"}),
    "concurrency": ("openai engine: requests in flight.", SERVERS, {}),
    # The engine resolves these (caictl.engines.generation), when it opens: a hf run never reads them.
    "max_retries": ("openai engine: retries of a request that fails on 429, 5xx, a time-out or a dropped "
                    "connection; unset: CAICTL_MAX_RETRIES, else `max_retries:` in caictl.yaml, else the "
                    "engine's own.", SERVERS, {}),
    "timeout": ("openai engine: seconds one request may take; unset: CAICTL_TIMEOUT, else `timeout:` in "
                "caictl.yaml, else the engine's own.", SERVERS, {}),
    "tokenizer": ("openai engine: the served model's tokenizer (folder or hub id), so that prompts go as token ids "
                  "with content read as text; unset: CAICTL_TOKENIZER, else `tokenizer:` in caictl.yaml, else "
                  "--model when it is a local folder or a cached hub id, else text prompts.", SERVERS,
                  {"metavar": "FOLDER|ID"}),
    "constitution": ("Shipped name or file(s), comma-separated.", METHOD, {"settings": "shared"}),
    "seed": ("Random seed.", RUNS, {"settings": "shared"}),
    "shard": ("Only part K (from 0) of N, chosen by a hash of each row's id, so N jobs (a Slurm array) cover "
              "the input once; --limit applies first; merge the outputs with cat.", RUNS, {"metavar": "K/N"}),
    "skip_invalid": ("Set bad rows aside in OUT.rejects.jsonl and go on.", INPUT_OUTPUT, {}),
}


def common(name: str, default=MISSING, **overrides) -> Field:
    """A field of COMMON, e.g. `seed: int = common("seed", 0)`; `overrides` replace its help or metadata."""
    help, panel, cli = COMMON[name]
    return option(default, overrides.pop("help", help), overrides.pop("panel", panel), **{**cli, **overrides})
