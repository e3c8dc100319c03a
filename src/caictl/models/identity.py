"""Which model wrote an output, by what the model is rather than how its path was spelled.

A resumed run appends to what an earlier run wrote, so both must come from the same model. A path string
cannot say that: `models/tiny/`, `models/tiny` and `/abs/models/tiny` are one model, and a model rebuilt at the
same path is another. So a local folder is identified by a sha256 over the files that decide its outputs
(config, tokenizer, template, weights); a hub id by the snapshot commit it resolves to in the local cache; a
served model by its name (not the URL, so a run can resume against another server holding the same model).

Hashing a multi-GB folder takes a while, so digests are cached in $CAICTL_CACHE/model-digests.json, keyed by
the folder and each file's size and modification time: a folder whose files did not change is not read again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from caictl.models.families import cache_root

# The files whose content decides what a folder generates or scores. caictl.json, plots and checkpoints do not.
_DECIDING = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
             "vocab.*", "merges.txt", "*.model", "chat_template.*", "*.safetensors", "*.bin",
             "*.safetensors.index.json", "adapter_config.json")


def identity(model: str, engine: str = "hf") -> str:
    """`sha256:<hex>` for a local folder, `hub:<id>@<commit>` for a cached hub model, `served:<name>` for a
    model behind a server, or the name as given where none of these can be known."""
    if engine != "hf":
        return f"served:{model}"
    path = Path(model)
    if path.is_dir():
        return f"sha256:{folder_digest(path)}"
    commit = _hub_commit(model)
    return f"hub:{model}@{commit}" if commit else model


def folder_digest(folder: Path) -> str:
    """sha256 over the deciding files' names and contents; from the cache when no file changed."""
    folder = folder.resolve()
    files = sorted({p for pattern in _DECIDING for p in folder.glob(pattern) if p.is_file()})
    stamps = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    cache_file = cache_root() / "model-digests.json"
    cache = _read_cache(cache_file)
    cached = cache.get(str(folder))
    if cached and cached.get("files") == stamps:
        return cached["sha256"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    cache[str(folder)] = {"files": stamps, "sha256": digest.hexdigest()}
    _write_cache(cache_file, cache)
    return digest.hexdigest()


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: digests are computed again


def _write_cache(path: Path, cache: dict) -> None:
    # Written whole to a temporary file, then renamed: a concurrent reader sees the old cache or the new one.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cache, indent=1), encoding="utf-8")
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only cache only costs the next run a re-hash


def _hub_commit(model: str) -> str | None:
    """The snapshot commit a hub id resolves to in the local cache (offline), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # not a valid hub id (a name a test engine goes by), or no huggingface_hub
        return None
    if not isinstance(found, str):
        return None
    parts = Path(found).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None
