"""serve-pm under load and faults: right answers, latency and memory of one `caictl serve-pm` process.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve_pm_load.py

Three parts, one JSON line each; the process exits 1 naming every condition broken (a wrong reward, a wrong
status, a request that outlasted --timeout, memory growth, a slow /health).

load: the server (a random-weight PM from `caictl init-model --task seq-cls`, as bench_serve_pm.py) is warmed
up, then 16 clients, each on its own kept-alive connection, send 2,000 requests of 1-16 texts, 5% of them
malformed in several ways (not JSON, no 'query', 'query' not a list of texts, more texts than the server takes,
'prompts' not one per query). Every well-formed request must get, to 1e-5, the rewards its texts got one request
at a time; every malformed one its 4xx; the server's RSS (/proc/PID/status) after the run must be within 10% of
its RSS after warm-up. Gives p50/p99 latency and texts/s.

faults: the same clients take turns (baseline, faults, baseline, faults) with connections that die mid-request:
half a body then FIN, half a body then RST, half the headers then FIN, a whole request closed before its answer,
and a few that send half a body and then nothing until the phase ends. The other clients' latency with and
without them says whether a dead client stalls the rest.

slow-judge: serve-pm with `--reward judge --engine openai` against a stub OpenAI-compatible server in this
process that takes 5 s over every completion; /health is timed while a reward request waits on the judge.
Skipped, with a line on stderr, while serve-pm has no --reward.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench_serve_pm import health, start_server, transcripts

from caictl.stages import init_model as tiny

TOLERANCE = 1e-5  # a reward from a shared forward pass against the same text scored alone
MEMORY_GROWTH = 0.10  # RSS after the load against RSS after warm-up
JUDGE_SECONDS = 5.0  # the stub judge's time per completion request
HEALTH_AT_ONCE = 1.0  # seconds /health may take while the judge is slow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(tiny.PRESETS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000, help="requests of the load part, all clients")
    parser.add_argument("--most-texts", type=int, default=16, help="a well-formed request holds 1 to this many")
    parser.add_argument("--malformed", type=float, default=0.05, help="share of the requests that are malformed")
    parser.add_argument("--fault-requests", type=int, default=300, help="requests in each phase of the faults part")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a client waits for an answer")
    parser.add_argument("--parts", default="load,faults,slow-judge")
    parser.add_argument("--judge-mode", default="rating", choices=["rating", "pairwise"],
                        help="slow-judge: pairwise sends each query's label, the reference reply")
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = set(parts) - {"load", "faults", "slow-judge"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}: load, faults, slow-judge")

    broken: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        if {"load", "faults"} & set(parts):
            pm = tiny.run(tiny.InitModelConfig(out=Path(folder) / "pm", preset=args.preset, task="seq-cls"))
            log = Path(folder) / "serve-pm.stderr"
            server, address = start_server(["--pm", str(pm), "--batch-size", str(args.batch_size)], log)
            try:
                pm_parts(args, parts, server.pid, address, broken)
            finally:
                stop(server)
                if broken:
                    print(f"serve-pm's stderr:\n{log.read_text()[-3000:]}", file=sys.stderr)
        if "slow-judge" in parts:
            slow_judge(args, Path(folder), broken)
    if broken:
        raise SystemExit("broken:\n  " + "\n  ".join(broken))


def pm_parts(args, parts: list[str], pid: int, address: tuple[str, int], broken: list[str]) -> None:
    pool = transcripts()
    limit = health(*address)["max_texts"]
    started = time.perf_counter()
    expected = {text: one_at_a_time(address, text) for text in pool}
    reference_seconds = time.perf_counter() - started
    # Warm-up: the connection threads, allocator arenas and padded batch shapes the parts will see, faults and all,
    # so that RSS after it is the level a leak would grow from.
    warm = Load(address, args.timeout, expected)
    warm.run(plan(random.Random(1), pool, args.clients * 10, args.most_texts, args.malformed, limit), args.clients)
    if "faults" in parts:
        with Faults(address, pool):
            warm.run(plan(random.Random(2), pool, args.clients * 10, args.most_texts, args.malformed, limit),
                     args.clients)
    broken += [f"warm-up: {problem}" for problem in warm.broken]
    rss_warm = rss_kib(pid)
    base = {"stage": "serve-pm", "preset": args.preset, "batch_size": args.batch_size, "clients": args.clients,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}

    if "load" in parts:
        load = Load(address, args.timeout, expected)
        seconds = load.run(plan(random.Random(0), pool, args.requests, args.most_texts, args.malformed, limit),
                           args.clients)
        rss_after = rss_kib(pid)
        broken += load.broken
        if abs(rss_after / rss_warm - 1) > MEMORY_GROWTH:
            broken.append(f"load: RSS {rss_warm:,} KiB after warm-up, {rss_after:,} KiB after the load "
                          f"({rss_after / rss_warm - 1:+.1%}; at most ±{MEMORY_GROWTH:.0%})")
        print(json.dumps({**base, "part": "load", "requests": args.requests, "malformed": load.malformed,
                          "malformed_kinds": sorted(set(load.kinds)), "texts": load.texts,
                          "seconds": round(seconds, 2), "texts_per_s": round(load.texts / seconds, 1),
                          "requests_per_s": round(args.requests / seconds, 1), **latencies(load.latency),
                          "reference_texts_one_at_a_time_per_s": round(len(pool) / reference_seconds, 1),
                          "rss_kib_after_warm_up": rss_warm, "rss_kib_after_load": rss_after,
                          "rss_change": round(rss_after / rss_warm - 1, 4), "broken": len(load.broken)}), flush=True)

    if "faults" in parts:
        phases = {"baseline": Load(address, args.timeout, expected), "faults": Load(address, args.timeout, expected)}
        injected: dict[str, int] = {}
        rss = []  # KiB after each phase
        seed = 10
        for _ in range(2):  # phases take turns: load on a shared machine drifts over minutes
            for name, load in phases.items():
                seed += 1
                requests = plan(random.Random(seed), pool, args.fault_requests, args.most_texts, args.malformed, limit)
                if name == "baseline":
                    load.run(requests, args.clients)
                else:
                    with Faults(address, pool) as faults:
                        load.run(requests, args.clients)
                    for kind, count in faults.injected.items():
                        injected[kind] = injected.get(kind, 0) + count
                    broken += [f"faults: {problem}" for problem in faults.problems]
                rss.append(rss_kib(pid))
        for name, load in phases.items():
            broken += [f"faults ({name} phase): {problem}" for problem in load.broken]
        try:
            after = health(*address)
        except OSError as error:
            broken.append(f"faults: /health after the faults part failed ({error})")
            after = {}
        rss_after = rss[-1]
        if abs(rss_after / rss_warm - 1) > MEMORY_GROWTH:
            broken.append(f"faults: RSS {rss_warm:,} KiB after warm-up, {rss_after:,} KiB after the faults part "
                          f"({rss_after / rss_warm - 1:+.1%}; at most ±{MEMORY_GROWTH:.0%}); after each phase: {rss}")
        base_lat, fault_lat = latencies(phases["baseline"].latency), latencies(phases["faults"].latency)
        print(json.dumps({**base, "part": "faults", "requests_per_phase": args.fault_requests, "phases": 4,
                          "injected": injected, "baseline": base_lat, "with_faults": fault_lat,
                          "p50_ratio": round(fault_lat["p50_ms"] / base_lat["p50_ms"], 2),
                          "p99_ratio": round(fault_lat["p99_ms"] / base_lat["p99_ms"], 2),
                          "server_rejected": after.get("rejected"), "server_failed": after.get("failed"),
                          "rss_kib_after_each_phase": rss, "rss_change": round(rss_after / rss_warm - 1, 4),
                          "broken": sum(len(load.broken) for load in phases.values())}), flush=True)


def one_at_a_time(address: tuple[str, int], text: str) -> float:
    connection = http.client.HTTPConnection(*address, timeout=60)
    connection.request("POST", "/get_reward", json.dumps({"query": [text]}), {"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    if response.status != 200:
        raise SystemExit(f"scoring one text failed ({response.status}): {answer}")
    return answer["rewards"][0]


# Requests ------------------------------------------------------------------------------------------------------


class Planned:
    """One request: its body, and what must come back (the texts' rewards, or a 4xx status)."""

    def __init__(self, body: bytes, texts: list[str] | None = None, status: int = 200, kind: str = ""):
        self.body, self.texts, self.status, self.kind = body, texts, status, kind


def plan(rng: random.Random, pool: list[str], requests: int, most: int, malformed: float, limit: int):
    """`requests` requests, a `malformed` share of them malformed (the kinds in turn), spread through the rest."""
    bad = set(rng.sample(range(requests), round(requests * malformed)))
    planned, kinds = [], 0
    for index in range(requests):
        texts = rng.choices(pool, k=rng.randint(1, most))
        if index in bad:
            planned.append(malformed_request(kinds, texts, limit))
            kinds += 1
        elif rng.random() < 0.5:  # OpenRLHF sends prompts beside the queries; they must pair, and are not read
            planned.append(Planned(json.dumps({"query": texts, "prompts": [t[:40] for t in texts]}).encode(), texts))
        else:
            planned.append(Planned(json.dumps({"query": texts}).encode(), texts))
    return planned


def malformed_request(which: int, texts: list[str], limit: int) -> Planned:
    kind, status, body = MALFORMED[which % len(MALFORMED)](texts, limit)
    return Planned(body if isinstance(body, bytes) else json.dumps(body).encode(), status=status, kind=kind)


MALFORMED = [
    lambda texts, limit: ("not JSON", 400, b'{"query": ["an unterminated string'),
    lambda texts, limit: ("not UTF-8", 400, b'{"query": ["\xff\xfe"]}'),
    lambda texts, limit: ("a JSON list", 400, texts),
    lambda texts, limit: ("no query", 400, {"prompts": texts}),
    lambda texts, limit: ("query a string", 400, {"query": texts[0]}),
    lambda texts, limit: ("query holds a number", 400, {"query": [*texts, 7]}),
    lambda texts, limit: ("too many texts", 413, {"query": ["a short text"] * (limit + 1)}),
    lambda texts, limit: ("prompts not one per query", 400, {"query": texts, "prompts": texts + ["one more"]}),
]


class Load:
    """Clients that share one list of requests, each on its own kept-alive connection, and check every answer."""

    def __init__(self, address: tuple[str, int], timeout: float, expected: dict[str, float]):
        self.address, self.timeout, self.expected = address, timeout, expected
        self.latency: list[float] = []  # seconds, well-formed requests only
        self.broken: list[str] = []
        self.texts = self.malformed = 0
        self.kinds: list[str] = []
        self.lock = threading.Lock()

    def run(self, requests: list[Planned], clients: int) -> float:
        """Seconds from the first request sent to the last answer read."""
        work = iter(requests)
        start = threading.Barrier(clients + 1)
        threads = [threading.Thread(target=self._client, args=(work, start)) for _ in range(clients)]
        for thread in threads:
            thread.start()
        start.wait()
        began = time.perf_counter()
        for thread in threads:
            thread.join()
        return time.perf_counter() - began

    def _client(self, work, start: threading.Barrier) -> None:
        connection = http.client.HTTPConnection(*self.address, timeout=self.timeout)
        start.wait()
        while True:
            with self.lock:  # a shared iterator: next() from two threads at once is not safe
                request = next(work, None)
            if request is None:
                break
            began = time.perf_counter()
            try:
                connection.request("POST", "/get_reward", request.body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                body = response.read()
            except TimeoutError:
                self._broke(f"no answer within {self.timeout} s ({describe(request)})")
                connection.close()  # a late answer must not be read as the next request's
                continue
            except (OSError, http.client.HTTPException) as error:
                self._broke(f"{type(error).__name__}: {error} ({describe(request)})")
                connection.close()
                continue
            seconds = time.perf_counter() - began
            self._check(request, response.status, body, seconds)
        connection.close()

    def _check(self, request: Planned, status: int, body: bytes, seconds: float) -> None:
        if request.texts is None:
            with self.lock:
                self.malformed += 1
                self.kinds.append(request.kind)
            if status != request.status:
                self._broke(f"{request.kind}: status {status}, expected {request.status}: {body[:200]!r}")
            return
        if status != 200:
            self._broke(f"status {status} for {describe(request)}: {body[:200]!r}")
            return
        answer = json.loads(body)
        rewards, want = answer.get("rewards"), [self.expected[text] for text in request.texts]
        if (not isinstance(rewards, list) or len(rewards) != len(want) or answer.get("scores") != rewards
                or len(answer.get("extra_logs", {}).get("pm_truncated_tokens", [])) != len(want)):
            self._broke(f"answer of the wrong shape for {describe(request)}: {body[:300]!r}")
            return
        worst = max(abs(got - wanted) for got, wanted in zip(rewards, want))
        if not worst <= TOLERANCE:  # also catches NaN
            self._broke(f"rewards off by up to {worst:.2e} from one at a time ({describe(request)}): got {rewards}, "
                        f"expected {want}")
        with self.lock:
            self.latency.append(seconds)
            self.texts += len(want)

    def _broke(self, problem: str) -> None:
        with self.lock:
            self.broken.append(problem)


def describe(request: Planned) -> str:
    return request.kind or f"{len(request.texts)} texts"


def latencies(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    if not ordered:
        return {"p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}

    def at(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": round(1000 * ordered[-1], 1),
            "mean_ms": round(1000 * statistics.fmean(ordered), 1)}


# Faults --------------------------------------------------------------------------------------------------------


class Faults:
    """While the block runs, connections that die mid-request, one kind after another; a few that stall with half a
    body stay open until it ends."""

    STALLED = 4
    PAUSE = 0.2  # seconds between two faults: a few a second, each a dead client, not a flood

    def __init__(self, address: tuple[str, int], pool: list[str]):
        self.address, self.pool = address, pool
        self.injected: dict[str, int] = {}
        self.problems: list[str] = []
        self.done = threading.Event()
        # One text: a request whose client has gone is still scored, and the others should not wait on the
        # extra work more than on any one client's request.
        body = json.dumps({"query": pool[:1]}).encode()
        self.body = body
        self.head = (f"POST /get_reward HTTP/1.1\r\nHost: {address[0]}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n").encode()

    def __enter__(self) -> Faults:
        self.stalled = [self._connect() for _ in range(self.STALLED)]
        for connection in self.stalled:
            connection.sendall(self.head + self.body[:len(self.body) // 2])
        self.injected["half a body, then nothing"] = self.STALLED
        self.thread = threading.Thread(target=self._inject)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        for connection in self.stalled:
            connection.close()

    def _inject(self) -> None:
        kinds = [self._half_body_fin, self._half_body_rst, self._half_headers, self._gone_before_answer]
        index = 0
        while not self.done.wait(self.PAUSE):
            kind = kinds[index % len(kinds)]
            index += 1
            try:
                name = kind()
            except OSError as error:  # the server refusing a connection is itself a finding
                self.problems.append(f"{kind.__name__}: {type(error).__name__}: {error}")
                continue
            self.injected[name] = self.injected.get(name, 0) + 1

    def _connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=10)

    def _half_body_fin(self) -> str:
        with self._connect() as connection:
            connection.sendall(self.head + self.body[:len(self.body) // 2])
        return "half a body, then FIN"

    def _half_body_rst(self) -> str:
        connection = self._connect()
        connection.sendall(self.head + self.body[:len(self.body) // 2])
        # Linger on, for 0 s: close() sends a reset, as the kernel does for a process killed with unread data.
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()
        return "half a body, then RST"

    def _half_headers(self) -> str:
        with self._connect() as connection:
            connection.sendall(self.head[:len(self.head) // 2])
        return "half the headers, then FIN"

    def _gone_before_answer(self) -> str:
        with self._connect() as connection:  # the server scores the text, then writes to a closed socket
            connection.sendall(self.head + self.body)
        return "a whole request, closed before the answer"


# Slow judge ----------------------------------------------------------------------------------------------------


def slow_judge(args, folder: Path, broken: list[str]) -> None:
    usage = subprocess.run([sys.executable, "-m", "caictl", "serve-pm", "--help"], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": "200"}).stdout
    if "--reward" not in usage:
        print("slow-judge: skipped, `caictl serve-pm --help` has no --reward", file=sys.stderr)
        return
    judge = StubJudge()
    log = folder / "serve-pm-judge.stderr"
    options = ["--reward", "judge", "--engine", "openai", "--base-url", judge.url, "--judge", "stub-model",
               "--judge-mode", args.judge_mode]
    server, address = start_server(options, log)
    query = transcripts()[:1]
    body = {"query": query, **({"labels": ["A reference reply."]} if args.judge_mode == "pairwise" else {})}
    try:
        answer: dict = {}

        def reward() -> None:
            began = time.perf_counter()
            try:
                connection = http.client.HTTPConnection(*address, timeout=300)
                connection.request("POST", "/get_reward", json.dumps(body), {"Content-Type": "application/json"})
                response = connection.getresponse()
                answer.update(status=response.status, body=response.read()[:300])
            except (OSError, http.client.HTTPException) as error:
                answer.update(error=f"{type(error).__name__}: {error}")
            answer["seconds"] = time.perf_counter() - began

        waiting = threading.Thread(target=reward)
        waiting.start()
        if not judge.asked.wait(60):
            broken.append("slow-judge: the reward request never reached the judge within 60 s")
        seconds = []
        while judge.in_flight and len(seconds) < 20:
            began = time.perf_counter()
            try:
                health(*address)
            except OSError as error:
                broken.append(f"slow-judge: /health failed while the judge was slow ({error})")
                break
            seconds.append(time.perf_counter() - began)
            time.sleep(0.1)
        waiting.join()
        if answer.get("status") != 200:
            broken.append(f"slow-judge: the reward request got {answer}")
        if seconds and max(seconds) > HEALTH_AT_ONCE:
            broken.append(f"slow-judge: /health took {max(seconds):.2f} s while the judge was slow "
                          f"(at most {HEALTH_AT_ONCE} s)")
        if not seconds:
            broken.append("slow-judge: no /health measured while a judge request was in flight")
        print(json.dumps({"stage": "serve-pm", "part": "slow-judge", "judge_mode": args.judge_mode,
                          "judge_seconds_per_request": JUDGE_SECONDS,
                          "judge_requests": judge.requests, "health_measured": len(seconds),
                          **({"health_p50_ms": round(1000 * statistics.median(seconds), 1),
                              "health_max_ms": round(1000 * max(seconds), 1)} if seconds else {}),
                          "reward_status": answer.get("status"), "reward_seconds": round(answer["seconds"], 2)}),
              flush=True)
    finally:
        stop(server)
        judge.close()
        if broken:
            print(f"serve-pm's stderr (judge):\n{log.read_text()[-3000:]}", file=sys.stderr)


class StubJudge:
    """An OpenAI-compatible server that takes JUDGE_SECONDS over every completion and answers with log-probs: the
    prompt echoed back in word-sized tokens when `echo` is asked, a one-token reply otherwise."""

    def __init__(self):
        stub = self
        self.asked, self.lock = threading.Event(), threading.Lock()
        self.requests = self.in_flight = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "stub-model", "object": "model",
                                                                 "owned_by": "benchmark"}]})
                else:
                    self._send(404, {"error": {"message": f"no {self.path}"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                path = self.path.rstrip("/")
                if not path.endswith(("/completions", "/chat/completions")):
                    self._send(404, {"error": {"message": f"no {self.path}"}})
                    return
                with stub.lock:
                    stub.requests += 1
                    stub.in_flight += 1
                stub.asked.set()
                try:
                    time.sleep(JUDGE_SECONDS)
                finally:
                    with stub.lock:
                        stub.in_flight -= 1
                self._send(200, chat_answer() if path.endswith("/chat/completions") else completion_answer(body))

            def log_message(self, format, *args):
                pass

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def logprob(token: str) -> float:
    """A plausible log-prob that differs between tokens, so that choices score apart."""
    return -0.2 - (sum(map(ord, token)) % 17) / 4


def completion_answer(body: dict) -> dict:
    prompt = body.get("prompt", "")
    prompt = prompt[0] if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) else prompt
    tokens = ([str(t) for t in prompt] if isinstance(prompt, list) else re.findall(r"\s*\S+|\s+", prompt)) \
        if body.get("echo") else []
    tokens.append(" 5")
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    values = [logprob(token) for token in tokens]
    if body.get("echo"):
        values[0] = None  # nothing comes before the first prompt token
    top = [None if value is None else {token: value} for token, value in zip(tokens, values)]
    return {"id": "cmpl-stub", "object": "text_completion", "created": int(time.time()), "model": "stub-model",
            "choices": [{"index": 0, "text": " 5", "finish_reason": "length",
                         "logprobs": {"tokens": tokens, "token_logprobs": values, "text_offset": offsets,
                                      "top_logprobs": top}}],
            "usage": {"prompt_tokens": len(tokens) - 1, "completion_tokens": 1, "total_tokens": len(tokens)}}


def chat_answer() -> dict:
    top = [{"token": t, "logprob": logprob(t), "bytes": list(t.encode())} for t in "54321"]
    return {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": "stub-model",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "5"},
                         "logprobs": {"content": [{**top[0], "top_logprobs": top}]}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


# Process -------------------------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    found = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(found.group(1))


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
