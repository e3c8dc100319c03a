"""families prepare: convert the real families' tokenizers once and cache them, for `caictl init-model --family`.

    caictl families prepare                  # once; `make setup` runs it
    caictl families prepare --sdist llama_cpp_python-0.3.36.tar.gz
    caictl families prepare --family phi3 --force

The vocabulary files come from llama-cpp-python's source package (pip downloads it, 76 MB, unless --sdist names
it); each conversion takes 5-90 s, which is why it runs once, outside any test or pipeline run. Families already
cached are skipped. The cache is $CAICTL_CACHE, else ~/.cache/caictl (see caictl.models.families).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from caictl.errors import UsageError
from caictl.models import families
from caictl.options import INPUT_OUTPUT, METHOD, RUNS, option


@dataclass
class FamiliesPrepareConfig:
    family: list[str] = option(help="Only this family (qwen2.5, llama3, phi3, llama2-spm). Repeatable; unset: all.",
                               panel=METHOD, default_factory=list, repeat=True, metavar="NAME")
    sdist: str | None = option(None, "llama-cpp-python's source package (.tar.gz) already on disk; unset: pip "
                               "downloads it.", INPUT_OUTPUT, metavar="FILE")
    cache: str | None = option(None, "Cache folder; unset: $CAICTL_CACHE, else ~/.cache/caictl.", INPUT_OUTPUT,
                               metavar="FOLDER")
    force: bool = option(False, "Convert again even where a tokenizer is cached.", RUNS)

    def check(self) -> None:
        unknown = [name for name in self.family if name not in families.FAMILIES]
        if unknown:
            raise UsageError(f"--family {', '.join(unknown)}: unknown; choose from {', '.join(families.FAMILIES)}")


def run(config: FamiliesPrepareConfig) -> dict[str, Path]:
    """Each family's cached tokenizer folder, converting the ones not cached yet."""
    config.check()
    return families.prepare(config.family or None, cache=_path(config.cache), sdist=_path(config.sdist),
                            force=config.force)


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None
