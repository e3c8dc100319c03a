"""Whether a hub id can load here, found out in one try: the local hub cache first, then one request with a short
time-out. transformers' own loader retries an unreachable hub five times with back-off (about 50 s on a machine
without network) and then blames the network, never saying that the value was perhaps meant as a local folder.
"""

from __future__ import annotations

# A hub that answers at all answers in well under this; a dropped connection should not hold a first run long.
ATTEMPT_TIMEOUT_S = 5.0
# A model repository holds one of these: a full model, or a LoRA adapter that names its base model.
MARKER_FILES = ("config.json", "adapter_config.json")


def is_hub_id(name: str) -> bool:
    """`owner/name` or `name` as the hub spells them. A path (./x, ../x, x/y/z, ~/x, /x, x\\y, x/) is not one."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def unavailable(repo_id: str) -> str | None:
    """None when repo_id can load: its files are in the cache, or the hub answered (the loader then reports what
    the hub said, a missing or gated repository included). Otherwise why not, for an error message."""
    from huggingface_hub import get_session, get_token, hf_hub_url, is_offline_mode, try_to_load_from_cache

    # try_to_load_from_cache returns a path when cached, None or a "known missing" marker otherwise.
    if any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in MARKER_FILES):
        return None
    if is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    # One plain HEAD on the hub's own HTTP client (its proxies and certificates): huggingface_hub's metadata call
    # would first fetch its telemetry registry, a second request to the same unreachable host.
    token = get_token()
    try:
        get_session().head(hf_hub_url(repo_id, MARKER_FILES[0]), timeout=ATTEMPT_TIMEOUT_S,
                           headers={"authorization": f"Bearer {token}"} if token else {})
    except Exception as error:  # the HTTP client's connection and time-out errors; their classes vary by version
        return f"{type(error).__name__}: {error}"
    return None  # any HTTP answer, 404 and 401 included: the hub is reachable, and the loader says the rest
