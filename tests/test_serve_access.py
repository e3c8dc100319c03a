"""Who may call a caictl server (caictl.serving): the rule on its own, then `caictl serve-pm` over real HTTP."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import caictl_in_process
from test_serve_pm import Client

from caictl import serving
from caictl.errors import UsageError
from caictl.models.pm import conversation_text
from caictl.stages import serve_pm

KEY = "s3cret-key-for-the-test"
TEXT = conversation_text([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])


# The rule --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"])
def test_loopback_needs_no_key(host):
    assert serving.access(host) == serving.Access(None, "none")
    assert serving.access(host).allows(None)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "::", "my-host.example"])
def test_any_other_host_gets_a_generated_key_unless_insecure(host):
    first, second = serving.access(host), serving.access(host)
    assert first.source == "generated" and len(first.key) >= 40 and first.key != second.key
    assert first.key in " ".join(first.start_lines(host))
    assert not first.allows(None) and first.allows(f"Bearer {first.key}")
    insecure = serving.access(host, insecure=True)
    assert insecure == serving.Access(None, "insecure") and insecure.allows(None)
    assert "--insecure" in insecure.start_lines(host)[0] and "no key" in insecure.start_lines(host)[0]


def test_the_key_comes_from_the_variable_api_key_env_names(monkeypatch):
    monkeypatch.setenv("SERVE_KEY", KEY)
    for host in ("127.0.0.1", "0.0.0.0"):  # named, it is required on loopback too
        rule = serving.access(host, "SERVE_KEY")
        assert rule == serving.Access(KEY, "env", "SERVE_KEY")
        assert KEY not in " ".join(rule.start_lines(host)) and "$SERVE_KEY" in rule.start_lines(host)[0]
    monkeypatch.setenv("SERVE_KEY", " ")
    with pytest.raises(UsageError, match=r"--api-key-env SERVE_KEY: \$SERVE_KEY is not set or empty"):
        serving.access("0.0.0.0", "SERVE_KEY")
    with pytest.raises(UsageError, match="--insecure and --api-key-env"):
        serving.access("0.0.0.0", "SERVE_KEY", insecure=True)


@pytest.mark.parametrize("header, allowed", [
    (f"Bearer {KEY}", True), (f"bearer {KEY}", True), (f"  Bearer   {KEY} ", True),
    (None, False), ("", False), ("Bearer", False), (f"Basic {KEY}", False), (f"Bearer {KEY}x", False),
    (f"Bearer {KEY[:-1]}", False), (KEY, False), ("Bearer s3cret-kéy", False), ("Bearer \udcff", False),
])
def test_a_bearer_header_matches_only_the_key(header, allowed):
    assert serving.bearer_matches(header, KEY) is allowed


def test_bad_access_options_fail_before_any_model_loads(tiny_pm):
    with pytest.raises(UsageError, match="--insecure serves without a key and --api-key-env sets one"):
        serve_pm.run(serve_pm.ServePMConfig(pm=str(tiny_pm), port=0, insecure=True, api_key_env="X"))


# Servers ---------------------------------------------------------------------------------------------------------


class Serving(Client):
    """`caictl serve-pm --pm PM --port 0 FLAGS` run by the command line's own code in a thread of this process (no
    new interpreter to load torch into), with what it logs kept in `lines`; stop() ends it as Ctrl-C would."""

    def __init__(self, monkeypatch, *args, env: dict | None = None, key: str | None = None):
        self.lines, servers = [], []
        real_listen = serve_pm._listen
        monkeypatch.setattr(serve_pm, "_listen", lambda config: servers.append(real_listen(config)) or servers[-1])
        monkeypatch.setattr(serve_pm, "log", self.lines.append)
        self.thread = threading.Thread(target=caictl_in_process, args=("serve-pm", "--port", 0, *args),
                                       kwargs={"env": env}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not any(line.startswith("listening on") for line in self.lines):
            assert self.thread.is_alive() and time.monotonic() < deadline, f"serve-pm did not start: {self.lines}"
            time.sleep(0.05)
        self.server = servers[0]
        printed = [line.split("key for this run: ")[1] for line in self.lines if "key for this run: " in line]
        super().__init__(*self.server.server_address[:2], key or (printed[0] if printed else None))

    def stop(self) -> None:
        self.server.shutdown()  # serve_forever() returns: run() drains and ends as after Ctrl-C
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.fixture
def serve(monkeypatch, tiny_pm):
    started = []

    def start(*flags, env=None, key=None) -> Serving:
        started.append(Serving(monkeypatch, "--pm", tiny_pm, *flags, env=env, key=key))
        return started[-1]

    yield start
    for serving_ in started:
        serving_.stop()


def refused_and_served(server: Client, key: str) -> None:
    """Without the key and with a wrong one: 401 on every path, /health included; with it: 200."""
    for bearer in (None, "wrong", key[:-1], key + "x"):
        client = Client(server.host, server.port, bearer)
        for status, answer in (client.get("/health"), client.post({"query": [TEXT]}), client.get("/nothing")):
            assert status == 401, answer
            assert "Authorization: Bearer <key>" in answer["error"] and key not in answer["error"]
    client = Client(server.host, server.port, key)
    status, health = client.get("/health")
    assert status == 200 and health["unauthorized"] == 12 and health["access"] in ("generated", "env")
    assert health["reward"] == "pm" and health["model_identity"].startswith("sha256:")
    assert len(client.rewards([TEXT])) == 1


def test_loopback_serves_without_a_key(serve):
    server = serve()
    assert "access: 127.0.0.1 is loopback, only this machine can connect; no key" in server.lines
    assert server.key is None
    status, health = server.get("/health")
    assert status == 200 and health["access"] == "none" and health["unauthorized"] == 0
    assert len(server.rewards([TEXT])) == 1


def test_another_host_without_a_key_gets_one_generated_and_printed_once(serve):
    server = serve("--host", "0.0.0.0")
    assert server.key and sum(server.key in line for line in server.lines) == 1
    assert any(line.startswith("access: every request needs `Authorization: Bearer <key>`; key for this run:")
               for line in server.lines)
    refused_and_served(server, server.key)
    assert server.key not in server.get("/health")[1].values()


def test_api_key_env_names_the_variable_that_holds_the_key(serve):
    server = serve("--host", "0.0.0.0", "--api-key-env", "SERVE_KEY", env={"SERVE_KEY": KEY}, key=KEY)
    assert "access: every request needs `Authorization: Bearer $SERVE_KEY` (--api-key-env SERVE_KEY)" in server.lines
    assert not any(KEY in line for line in server.lines)
    refused_and_served(server, KEY)


def test_insecure_serves_without_a_key_and_says_so(serve):
    server = serve("--host", "0.0.0.0", "--insecure")
    assert ("access: --insecure: anyone who can reach 0.0.0.0 may call, with no key (a trusted network only)"
            in server.lines)
    assert server.key is None
    status, health = server.get("/health")
    assert status == 200 and health["access"] == "insecure"
    assert len(server.rewards([TEXT])) == 1
