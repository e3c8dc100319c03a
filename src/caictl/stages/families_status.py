"""families status: which real families' tokenizers are prepared, and where (one tab-separated line each).

    caictl families status
    caictl families status --cache /data/caictl-cache
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from caictl.models import families
from caictl.options import INPUT_OUTPUT, option


@dataclass
class FamiliesStatusConfig:
    cache: str | None = option(None, "Cache folder; unset: $CAICTL_CACHE, else ~/.cache/caictl.", INPUT_OUTPUT,
                               metavar="FOLDER")


def run(config: FamiliesStatusConfig) -> dict[str, bool]:
    """Print each family's folder and state on stdout (a table to pipe or grep); return which are prepared."""
    cache = Path(config.cache).expanduser() if config.cache else None
    prepared = {name: families.is_prepared(name, cache) for name in families.FAMILIES}
    for name, ready in prepared.items():
        state = "ready" if ready else f"not prepared: run `{families.PREPARE_COMMAND}`"
        print(f"{name}\t{families.tokenizer_folder(name, cache)}\t{state}")
    return prepared
