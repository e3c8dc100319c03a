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


def option(default=MISSING, help: str = "", panel: str = METHOD, *, default_factory=MISSING, **cli) -> Field:
    """A config field with its command-line help. `cli` holds what the flag needs beyond the field's name and
    type, read by caictl.cli only: `flag` (e.g. "--soft/--hard", "--pairs"), `short` ("-o"), `argument` (a
    positional argument), `metavar`, `settings` (how caictl.yaml / CAICTL_* fill it), `cli=False` (no flag)."""
    if panel not in PANELS:
        raise ValueError(f"unknown help panel {panel!r}; one of {PANELS}")
    metadata = {"help": help, "panel": panel, **cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)
