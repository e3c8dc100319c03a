"""Several inference servers at once: two llama.cpp servers on the tiny model, each its own process and port,
named by --base-url given twice (or comma-separated, CAICTL_BASE_URL, a caictl.yaml list). Both get work, counted
from their own access logs; a server killed mid-run loses nothing; and the text equals a one-server run's, since
every request carries its own seed. The picking rule itself: tests/test_engine_openai.py."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import llama_server
import pytest
from conftest import EXAMPLES, caictl, caictl_in_process, read_jsonl, write_jsonl

tiny_gguf = llama_server.tiny_gguf

PROMPTS = 16
# revise makes three requests a prompt at one round (response, critique, revision); a batch of 2 prompts is two
# requests in flight, so a 16-prompt run is 24 engine calls: long enough to kill a server in the middle.
REVISE = ["--engine", "openai", "--model", "tiny", "--rounds", "1", "--max-new-tokens", "8", "--shots", "1",
          "--batch-size", "2", "--concurrency", "4"]


# One thread each: llama.cpp's threads spin while they wait, and two servers' pairs of them on a two-core machine
# made a two-server run several times slower than a one-server run.
THREADS = 1


@pytest.fixture(scope="module")
def servers(tiny_gguf, tmp_path_factory):
    """Two llama.cpp servers on the tiny model, for this module (tests that kill one start their own)."""
    root = tmp_path_factory.mktemp("two-servers")
    with llama_server.serve_process(tiny_gguf[1], log_path=root / "a.log", threads=THREADS) as a, \
            llama_server.serve_process(tiny_gguf[1], log_path=root / "b.log", threads=THREADS) as b:
        yield a, b


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rows = read_jsonl(EXAMPLES / "red-team.jsonl")[:PROMPTS]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


@pytest.fixture(scope="module")
def one_server_run(servers, prompts, tmp_path_factory) -> dict:
    """What revise writes with one server, by row id: what every run with two must equal."""
    out = tmp_path_factory.mktemp("one-server") / "r.jsonl"
    caictl_in_process("revise", prompts, *REVISE, "--base-url", servers[0].url, "-o", out)
    rows = by_id(read_jsonl(out))
    # Sampled texts, different from prompt to prompt: comparing them can fail.
    assert len(rows) == PROMPTS and len({r["initial_response"] for r in rows.values()}) > PROMPTS // 2
    return rows


# Every way of naming the servers, and which of the two each names.
FORMS = {
    "flag repeated": (["--base-url", "{a}", "--base-url", "{b}"], {}, None, "ab"),
    "flag comma-separated": (["--base-url", "{a},{b}"], {}, None, "ab"),
    "environment comma-separated": ([], {"CAICTL_BASE_URL": "{a}, {b}"}, None, "ab"),
    "caictl.yaml list": ([], {}, "base_url:\n  - {a}\n  - {b}\n", "ab"),
    "one flag": (["--base-url", "{b}"], {}, None, "b"),
    "one in the environment": ([], {"CAICTL_BASE_URL": "{a}"}, None, "a"),
    "one in caictl.yaml": ([], {}, "base_url: {b}\n", "b"),
    "the flag over the environment": (["--base-url", "{b}"], {"CAICTL_BASE_URL": "{a}"}, None, "b"),
}


@pytest.mark.parametrize(("flags", "env", "yaml", "named"), FORMS.values(), ids=FORMS.keys())
def test_every_form_of_base_url_reaches_the_servers_it_names(servers, prompts, tmp_path, monkeypatch, flags, env,
                                                            yaml, named):
    urls = {"a": servers[0].url, "b": servers[1].url}
    if yaml:
        (tmp_path / "caictl.yaml").write_text(yaml.format(**urls))
    monkeypatch.chdir(tmp_path)
    before = [s.requests() for s in servers]
    caictl_in_process("sample", prompts, "--limit", "2", "-n", "2", "--max-new-tokens", "4", "--engine", "openai",
                      "--model", "tiny", "--concurrency", "4", "-o", tmp_path / "pairs.jsonl",
                      *[f.format(**urls) for f in flags], env={k: v.format(**urls) for k, v in env.items()})
    got = dict(zip("ab", (s.requests() - b for s, b in zip(servers, before))))
    assert sum(got.values()) == 4 and len(read_jsonl(tmp_path / "pairs.jsonl")) == 2
    assert {name for name, count in got.items() if count} == set(named), got


BAD = {
    "empty entry in the flag": (["--base-url", "http://127.0.0.1:1/v1,,http://127.0.0.1:2/v1"], {}, None,
                                "--base-url: an empty entry in 'http://127.0.0.1:1/v1,,http://127.0.0.1:2/v1'"),
    "no scheme in the flag": (["--base-url", "http://127.0.0.1:1/v1", "--base-url", "localhost:8000/v1"], {}, None,
                              "--base-url: 'localhost:8000/v1' is not an http:// or https:// URL"),
    "trailing comma in the environment": ([], {"CAICTL_BASE_URL": "http://127.0.0.1:1/v1,"}, None,
                                          "CAICTL_BASE_URL: an empty entry in 'http://127.0.0.1:1/v1,'"),
    "the same server twice": ([], {"CAICTL_BASE_URL": "http://127.0.0.1:1/v1,http://127.0.0.1:1/v1"}, None,
                              "CAICTL_BASE_URL: http://127.0.0.1:1/v1 is listed twice"),
    "a number in the caictl.yaml list": ([], {}, "base_url: [http://127.0.0.1:1/v1, 8000]\n",
                                         "caictl.yaml: base_url: 8000 is not a URL"),
    "a mapping in caictl.yaml": ([], {}, "base_url: {host: a}\n",
                                 "caictl.yaml: base_url: expected a URL or a list of URLs"),
}


@pytest.mark.parametrize(("flags", "env", "yaml", "message"), BAD.values(), ids=BAD.keys())
def test_a_bad_base_url_stops_the_run_naming_where_it_came_from(prompts, tmp_path, flags, env, yaml, message):
    if yaml:
        (tmp_path / "caictl.yaml").write_text(yaml)
    result = caictl("sample", prompts, "--limit", "1", "-n", "1", "--engine", "openai", "--model", "tiny", *flags,
                    cwd=tmp_path, env=env, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_two_servers_share_the_work_and_write_what_one_server_writes(servers, prompts, one_server_run, tmp_path,
                                                                    capsys):
    before = [s.requests() for s in servers]
    out = tmp_path / "r.jsonl"
    capsys.readouterr()
    caictl_in_process("revise", prompts, *REVISE, "--base-url", servers[0].url, "--base-url", servers[1].url,
                      "-o", out)
    got = [s.requests() - b for s, b in zip(servers, before)]
    # Two requests in flight at a time, one to each server: about half each.
    assert sum(got) == 3 * PROMPTS and min(got) >= PROMPTS // 2, got
    assert by_id(read_jsonl(out)) == one_server_run
    # The stage's closing line says how the work was spread, as the servers saw it.
    assert spread(capsys.readouterr().err) == {s.url: (n, 0) for s, n in zip(servers, got)}


@pytest.mark.slow
def test_a_server_killed_mid_run_loses_nothing(servers, tiny_gguf, prompts, one_server_run, tmp_path):
    # Its own second server: the module's two serve the other tests.
    with llama_server.serve_process(tiny_gguf[1], log_path=tmp_path / "doomed.log", threads=THREADS) as doomed:
        out, stderr = tmp_path / "r.jsonl", tmp_path / "stderr.txt"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAICTL_")}
        with open(stderr, "w") as handle:
            run = subprocess.Popen([sys.executable, "-m", "caictl", "revise", str(prompts), *REVISE, "--base-url",
                                    servers[0].url, "--base-url", doomed.url, "-o", str(out)],
                                   stdout=subprocess.DEVNULL, stderr=handle, env=env)
        deadline = time.time() + 120
        while time.time() < deadline and lines(out) < 2 and run.poll() is None:
            time.sleep(0.01)
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait()
        rows_at_kill, served_by_doomed = lines(out), doomed.requests()
        code = run.wait(timeout=300)
    log = stderr.read_text()
    assert code == 0, log
    assert 2 <= rows_at_kill < PROMPTS and served_by_doomed > 0, "the server should have died mid-run, having served"
    rows = read_jsonl(out)
    assert len(rows) == PROMPTS and by_id(rows) == one_server_run
    # The killed server failed at least one request (one in flight, or the next sent to it), which went to the
    # other server. (Its access log may hold one more answer than the engine got: a line is written as the answer
    # starts.)
    sent, failed = spread(log)[doomed.url]
    assert failed >= 1 and 0 < sent - failed <= served_by_doomed, log
    assert f"{doomed.url}: APIConnectionError; out of rotation for 2 s" in log


def test_every_server_down_fails_naming_each(prompts):
    urls = [f"http://127.0.0.1:{port}/v1" for port in unused_ports(2)]
    result = caictl("sample", prompts, "--limit", "1", "-n", "1", "--engine", "openai", "--model", "tiny",
                    "--base-url", urls[0], "--base-url", urls[1], "--max-retries", "1", check=False)
    assert result.returncode == 1
    assert "every server failed: " in result.stderr and "gave up after 2 rounds" in result.stderr
    assert "raise --max-retries" in result.stderr
    for url in urls:
        assert re.search(rf"{re.escape(url)} \(APIConnectionError; \d of \d requests failed\)", result.stderr)


def by_id(rows: list[dict]) -> dict:
    return {row["id"]: row for row in rows}


def lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def spread(stderr: str) -> dict[str, tuple[int, int]]:
    """{url: (requests sent, failed)} from a stage's 'requests per server' line."""
    (line,) = [line for line in stderr.splitlines() if line.startswith("requests per server: ")]
    return {url: (int(sent), int(failed)) for url, sent, failed in re.findall(r"(\S+) (\d+) \((\d+) failed\)", line)}


def unused_ports(count: int) -> list[int]:
    """Ports nothing listens on (each bound at once, so they differ; closed before they are used)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
