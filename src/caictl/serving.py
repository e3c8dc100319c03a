"""Who may call a server caictl runs: one rule for every one of them (serve-pm, and any server added later).

- Loopback (127.0.0.0/8, ::1, localhost) by default: only this machine can connect, no key.
- Any other --host needs a key. `--api-key-env NAME` takes it from the environment variable NAME (never from a
  flag: a flag's value shows in `ps` and in shell history); without it a key is generated and printed once at
  start, for this run only.
- `--insecure` binds a non-loopback host without a key, for a trusted network, and says so at start.

With a key, every request, /health included, must carry `Authorization: Bearer <key>`; the server answers 401
otherwise. The key is compared in constant time (hmac.compare_digest), so the answer's timing says nothing about
how much of a guess was right.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass

from caictl.errors import UsageError

KEY_BYTES = 32  # secrets.token_urlsafe(32): 43 characters, 256 bits


@dataclass(frozen=True)
class Access:
    """Who may call: `key` None lets anyone who can connect; otherwise requests must carry it as a bearer token.

    source: how the key came (for the start-up lines): "none" (loopback), "env" (--api-key-env), "generated",
    "insecure" (a non-loopback host without a key, as asked)."""

    key: str | None
    source: str
    env: str | None = None

    def allows(self, authorization: str | None) -> bool:
        """Whether a request with this Authorization header may be answered."""
        return self.key is None or bearer_matches(authorization, self.key)

    def start_lines(self, host: str) -> list[str]:
        """What to say at start: who may call, and the key when it was generated here (the only time it shows)."""
        if self.source == "none":
            return [f"access: {host} is loopback, only this machine can connect; no key"]
        if self.source == "insecure":
            return [f"access: --insecure: anyone who can reach {host} may call, with no key (a trusted network only)"]
        if self.source == "env":
            return [f"access: every request needs `Authorization: Bearer ${self.env}` (--api-key-env {self.env})"]
        return [f"access: every request needs `Authorization: Bearer <key>`; key for this run: {self.key}",
                "access: the key is generated at each start; pass --api-key-env NAME to read a fixed one from $NAME"]


def access(host: str, api_key_env: str | None = None, insecure: bool = False) -> Access:
    """The rule applied to a server's options; UsageError names the flag that is wrong."""
    if api_key_env is not None and insecure:
        raise UsageError("--insecure and --api-key-env contradict each other: --insecure serves without a key, "
                         "--api-key-env sets one; pass one of them")
    if api_key_env is not None:
        if not api_key_env:
            raise UsageError("--api-key-env needs the name of an environment variable, e.g. --api-key-env "
                             "CAICTL_API_KEY")
        key = os.environ.get(api_key_env, "")
        if not key.strip():
            raise UsageError(f"--api-key-env {api_key_env}: ${api_key_env} is not set or empty; set it (e.g. "
                             f"`export {api_key_env}=$(python -c 'import secrets; print(secrets.token_urlsafe())')`)")
        return Access(key.strip(), "env", api_key_env)
    if is_loopback(host):
        return Access(None, "none")
    if insecure:
        return Access(None, "insecure")
    return Access(new_key(), "generated")


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach an address: 127.0.0.0/8, ::1 or the name localhost. Other names count as
    reachable from elsewhere (what a name resolves to can change)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_key() -> str:
    return secrets.token_urlsafe(KEY_BYTES)


def bearer_matches(authorization: str | None, key: str) -> bool:
    """Whether an Authorization header is `Bearer <key>`; compared in constant time."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    # Both sides go as bytes: compare_digest refuses str holding non-ASCII, which a client may send.
    given = token.strip().encode("utf-8", "surrogateescape") if scheme.lower() == "bearer" else b""
    return hmac.compare_digest(given, key.encode("utf-8"))
