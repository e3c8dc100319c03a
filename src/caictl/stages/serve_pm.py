"""serve-pm: a preference model as a reward server over HTTP, for RL at scale (OpenRLHF, TRL's GRPO, verl).

    caictl serve-pm --pm models/pm --port 5000 --policy models/sl-cai

POST /get_reward takes OpenRLHF's remote reward model request, `{"query": [texts], "prompts": [...], "labels": [...]}`
(a query is the whole conversation, prompt and response; prompts and labels are optional and not read, but prompts,
when sent, must pair one to one with the queries), and answers `{"rewards": [...], "scores": [...], "extra_logs":
{"pm_truncated_tokens": [...]}}`, one entry per query in each list: scores (OpenRLHF's dynamic filtering reads them)
are the rewards, and pm_truncated_tokens says how many tokens each text lost from its front to --max-length. GET
/health says the server is up, with its settings and counters. Errors answer `{"error": "..."}`: 400 for a request
that is not of that shape (or a query that does not parse), 413 for more than MAX_TEXTS texts or a body over
MAX_BODY bytes, 404 / 405 for another path or method, 500 when scoring fails; the server keeps serving.

Ctrl-C or SIGTERM stops it gracefully: no new connections, idle kept-alive ones closed, every request already read
scored and answered (DRAIN_SECONDS at most), one that comes after the model thread ended answered 503.

What the PM reads: without --policy, each query as it is (send transcripts, caictl.models.pm.conversation_text). With
--policy, each query is text the policy's chat template wrote, as OpenRLHF sends it; it is read back into messages
(caictl.data.chat_format) and scored as their transcript, so a reward equals `caictl score` on the same conversation. A
system message equal to the template's default (Qwen2.5 writes one when none is given) reads as none.

One thread owns the model. Request threads queue their texts and wait; the model thread takes the texts of every
waiting request, up to --batch-size, scores them in one forward pass, and hands each request its own rewards. Texts
from concurrent requests so share forward passes, with no waiting added: a batch is whatever queued while the
previous one ran. Python's standard library serves HTTP (http.server), so serving adds no dependency.
"""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from caictl.data.chat_format import ParseError
from caictl.errors import UsageError
from caictl.models import kind as model_kind
from caictl.models.pm import Scorer, conversation_text
from caictl.options import MODEL_ENGINE, RUNS, SERVERS, option
from caictl.ui import log, summary_table

MAX_TEXTS = 1024  # texts in one request
MAX_BODY = 16 * 1024 * 1024  # bytes of one request body (16 MiB)
DRAIN_SECONDS = 10  # at the end, how long answers already being scored or sent may take


@dataclass
class ServePMConfig:
    pm: str = option(help="A train-pm output folder.", panel=MODEL_ENGINE)
    port: int = option(help="TCP port; 0 takes a free one (the URL printed at start says which).", panel=SERVERS)
    host: str = option("127.0.0.1", "Address to listen on; 0.0.0.0 for every interface (no authentication: a "
                                    "trusted network only).", SERVERS)
    batch_size: int = option(32, "Texts per forward pass, at most, gathered from every waiting request.",
                             MODEL_ENGINE, settings="stage")
    max_length: int = option(512, "Tokens of each text the PM reads, kept from the end (as `caictl score`).",
                             MODEL_ENGINE)
    policy: str | None = option(None, "The policy (folder or hub id) whose chat template wrote the queries: each is "
                                      "read back into messages and scored as their transcript. Unset: a query is "
                                      "the PM's text as it is.", MODEL_ENGINE)
    log_every: int = option(0, "A throughput line on stderr every N requests; 0: none.", RUNS)

    def check(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"--port {self.port}: expected 0-65535 (0: any free port)")
        if self.batch_size < 1:
            problems.append("--batch-size must be at least 1")
        if self.max_length < 1:
            problems.append("--max-length must be at least 1")
        if self.log_every < 0:
            problems.append("--log-every must be 0 (no throughput lines) or more")
        if problems:
            raise UsageError("; ".join(problems))


def run(config: ServePMConfig) -> dict:
    """Serves until Ctrl-C or SIGTERM, then returns the counters."""
    config.check()
    model_kind.check(config.pm, model_kind.SEQ_CLS, "--pm")
    if config.policy:
        model_kind.require(config.policy, "--policy")
    chat_format = _chat_format(config.policy) if config.policy else None
    server = _listen(config)  # before the PM loads: a port in use fails in a second, not after the load
    try:
        scorer = Scorer(config.pm, max_length=config.max_length, batch_size=config.batch_size)
        server.batcher = batcher = Batcher(scorer, config.batch_size, config.log_every)
        server.chat_format = chat_format
        server.info = {"pm": config.pm, "policy": config.policy, "batch_size": config.batch_size,
                       "max_length": scorer.max_length, "max_texts": MAX_TEXTS, "max_body_bytes": MAX_BODY}
        host, port = server.server_address[:2]
        summary_table("serve-pm", [
            ("pm", config.pm), ("queries", f"--policy {config.policy} chat template, read back into transcripts"
                                if config.policy else "the PM's text as sent (no --policy)"),
            ("batch size", config.batch_size), ("max length", scorer.max_length), ("device", scorer.device),
            ("log every", f"{config.log_every} requests" if config.log_every else "off")])
        log(f"listening on http://{host}:{port}/get_reward (GET /health); Ctrl-C stops")
        with _sigterm_as_ctrl_c(), contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
        left_open = server.drain()
        if left_open:
            log(f"serve-pm: {left_open} connection(s) still busy after {DRAIN_SECONDS} s; ending without them")
    finally:
        server.server_close()
    stats = batcher.stats.snapshot()
    summary_table("serve-pm stopped", list(stats.items()))
    return {"stage": "serve-pm", **stats}


def _chat_format(policy: str):
    from transformers import AutoTokenizer

    from caictl.data.chat_format import ChatFormat

    try:
        tokenizer = AutoTokenizer.from_pretrained(policy)
    except OSError as error:
        raise UsageError(f"--policy {policy}: cannot load its tokenizer ({str(error).splitlines()[0]})")
    return ChatFormat.learn(tokenizer, f"--policy {policy}")


def _listen(config: ServePMConfig) -> RewardServer:
    try:
        return RewardServer((config.host, config.port), Handler)
    except OSError as error:
        raise UsageError(f"cannot listen on {config.host}:{config.port} ({error.strerror or error}); "
                         "pick another --port (0: any free one) or --host")


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """SIGTERM (a scheduler ending the job) stops serving as Ctrl-C does. Signals reach only the main thread: run()
    called from another thread leaves them alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt()


# Batching ------------------------------------------------------------------------------------------------------


class Request:
    """One HTTP request's texts and, once scored, one reward and one cut per text, in its order."""

    def __init__(self, texts: list[str]):
        self.texts = texts
        self.rewards: list = [None] * len(texts)
        self.cut: list = [None] * len(texts)
        self.left = len(texts)  # texts not scored yet
        self.error: str | None = None
        self.done = threading.Event()


class ScoringError(Exception):
    pass


class Stopping(Exception):
    """The model thread has ended: a request that comes after it is refused, never left waiting."""


_STOP = object()


class Batcher:
    """The model's one thread and the queue of (request, text index) that feeds it."""

    def __init__(self, scorer, batch_size: int, log_every: int = 0):
        self.scorer, self.batch_size, self.log_every = scorer, batch_size, log_every
        self.queue = queue.SimpleQueue()
        self.stats = Stats()
        self.stopping, self.stop_lock = False, threading.Lock()
        self.thread = threading.Thread(target=self._work, name="caictl-pm", daemon=True)
        self.thread.start()

    def score(self, texts: list[str]) -> tuple[list[float], list[int]]:
        """(rewards, tokens cut) of the texts, in order, once the model thread has scored them all."""
        if not texts:
            return [], []
        request = Request(texts)
        with self.stop_lock:  # all of a request's texts go in before the end marker, or none of them
            if self.stopping:
                raise Stopping("the server is stopping")
            for index in range(len(texts)):
                self.queue.put((request, index))
        request.done.wait()
        if request.error:
            raise ScoringError(request.error)
        return request.rewards, request.cut

    def stop(self) -> None:
        """Score what is queued, then end the model thread."""
        with self.stop_lock:
            self.stopping = True
            self.queue.put(_STOP)
        self.thread.join()

    def _work(self) -> None:
        while True:
            batch = [self.queue.get()]  # blocks until some request queues a text
            if batch[0] is _STOP:
                return
            while len(batch) < self.batch_size:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self.queue.put(item)  # ends the loop once this batch is scored
                    break
                batch.append(item)
            batch = [(request, index) for request, index in batch if request.error is None]  # failed: unanswered
            if batch:
                self._score(batch)

    def _score(self, batch: list[tuple[Request, int]]) -> None:
        texts = [request.texts[index] for request, index in batch]
        try:
            rewards, cut = self.scorer.score(texts), self.scorer.cut_tokens(texts)
        except Exception as error:  # noqa: BLE001 - any failure is the requests' 500, never the server's end
            requests = list(dict.fromkeys(request for request, _ in batch))  # in queue order
            if len(requests) > 1:  # score each request apart, so that one bad text fails only its own request
                for request in requests:
                    self._score([item for item in batch if item[0] is request])
                return
            requests[0].error = f"scoring failed: {type(error).__name__}: {error}"
            log(f"serve-pm: {requests[0].error}")
            self.stats.count(failed=1)
            requests[0].done.set()
            return
        self.stats.count_batch(len(texts), len({request for request, _ in batch}))
        for (request, index), reward, tokens_cut in zip(batch, rewards, cut):
            request.rewards[index], request.cut[index] = reward, tokens_cut
            request.left -= 1
            if request.left == 0:
                # Counted before the answer goes: a client that reads /health next sees its request in it.
                served = self.stats.count(requests=1, texts=len(request.texts))
                request.done.set()
                if self.log_every and served % self.log_every == 0:
                    log(self.stats.throughput())


class Stats:
    """Counters for /health and the closing summary; request threads and the model thread both add to them."""

    def __init__(self):
        self.lock, self.start = threading.Lock(), time.perf_counter()
        self.values = dict.fromkeys(("requests", "texts", "forward_passes", "largest_batch",
                                     "most_requests_in_a_batch", "rejected", "failed"), 0)

    def count(self, **added) -> int:
        """Adds to counters; returns the number of requests served."""
        with self.lock:
            for name, value in added.items():
                self.values[name] += value
            return self.values["requests"]

    def count_batch(self, texts: int, requests: int) -> None:
        with self.lock:
            self.values["forward_passes"] += 1
            self.values["largest_batch"] = max(self.values["largest_batch"], texts)
            self.values["most_requests_in_a_batch"] = max(self.values["most_requests_in_a_batch"], requests)

    def snapshot(self) -> dict:
        with self.lock:
            return {**self.values, "seconds": round(time.perf_counter() - self.start, 1)}

    def throughput(self) -> str:
        values = self.snapshot()
        seconds = max(values["seconds"], 1e-9)
        return (f"serve-pm: {values['requests']:,} requests, {values['texts']:,} texts in {seconds:,.0f} s "
                f"({values['requests'] / seconds:.1f} requests/s, {values['texts'] / seconds:.1f} texts/s, "
                f"{values['texts'] / max(values['forward_passes'], 1):.1f} texts per forward pass)")


# HTTP ----------------------------------------------------------------------------------------------------------


class RewardServer(ThreadingHTTPServer):
    """One thread per connection, each known until it ends, so that drain() can end them all before the process
    does: a thread still running Python code while the interpreter shuts down may crash it at exit."""

    daemon_threads = True  # a connection drain() gave up on never holds up the end
    request_queue_size = 128  # connections waiting to be accepted: a burst from many rollout workers at once
    batcher: Batcher
    chat_format = None
    info: dict

    def __init__(self, address, handler):
        # Connection socket -> the thread serving it. A thread is forgotten once it has wholly ended (checked when
        # the next connection comes), not when its connection closes: drain() also waits for its last steps.
        self.connections: dict = {}
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address), daemon=True,
                                  name=f"caictl-connection-{client_address[1]}")
        with self.connections_lock:
            self.connections = {s: t for s, t in self.connections.items() if t.is_alive()}
            self.connections[request] = thread
        thread.start()

    def drain(self) -> int:
        """Once serve_forever() has returned: ends idle kept-alive connections, scores every queued text, and waits
        (DRAIN_SECONDS at most) for the answers being sent. Returns how many connections are still busy."""
        with self.connections_lock:
            connections = dict(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # one already closed
                # A thread waiting for the client's next request reads the end now, not at the 60 s idle timeout;
                # one that has its request goes on and sends the answer.
                connection.shutdown(socket.SHUT_RD)
        self.batcher.stop()
        deadline = time.monotonic() + DRAIN_SECONDS
        for thread in connections.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(thread.is_alive() for thread in connections.values())

    def handle_error(self, request, client_address):
        """A client that went away or stalled mid-request is its own business; anything else is one line."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            log(f"serve-pm: {type(error).__name__}: {error} (a request from {client_address[0]})")


class HTTPFailure(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Handler(BaseHTTPRequestHandler):
    """One thread per connection (keep-alive: a client's requests reuse it)."""

    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a connection may sit idle, or a body take to arrive
    # The headers and the body go out as two writes: with Nagle's algorithm on, the second waits for the client's
    # delayed ACK, 40 ms a request on a kept-alive connection.
    disable_nagle_algorithm = True
    server: RewardServer

    def do_GET(self):
        self._answer("GET")

    def do_POST(self):
        self._answer("POST")

    def log_message(self, format, *args):
        pass  # no line per request: a rollout sends thousands (the counters are in /health, --log-every)

    def _answer(self, method: str) -> None:
        self.unread = 0  # body bytes a refused request still has on the socket
        routes = {"/get_reward": ("POST", self._get_reward), "/health": ("GET", self._health)}
        path = urlsplit(self.path).path
        try:
            self.unread = self._content_length(required=method == "POST")
            if path not in routes:
                raise HTTPFailure(404, f"no such path {path!r}: POST /get_reward, GET /health")
            if method != routes[path][0]:
                raise HTTPFailure(405, f"{path} takes {routes[path][0]}, not {method}")
            self._send(200, routes[path][1]())
        except HTTPFailure as failure:
            if failure.status < 500:
                self.server.batcher.stats.count(rejected=1)
            self._send(failure.status, {"error": failure.message})

    def _health(self) -> dict:
        return {"status": "ok", **self.server.info, **self.server.batcher.stats.snapshot()}

    def _get_reward(self) -> dict:
        if self.unread > MAX_BODY:
            raise HTTPFailure(413, f"body of {self.unread:,} bytes: at most {MAX_BODY:,} (send fewer texts a request)")
        body, self.unread = self.rfile.read(self.unread), 0
        queries = reward_request(body)
        texts = pm_texts(queries, self.server.chat_format)
        try:
            rewards, cut = self.server.batcher.score(texts)
        except ScoringError as error:
            raise HTTPFailure(500, str(error))
        except Stopping as error:
            raise HTTPFailure(503, f"{error}: send the request to another server")
        return {"rewards": rewards, "scores": rewards, "extra_logs": {"pm_truncated_tokens": cut}}

    def _content_length(self, required: bool) -> int:
        value = self.headers.get("Content-Length")
        if value is None:
            if required:
                raise HTTPFailure(411, "a POST needs a Content-Length header (chunked bodies are not read)")
            return 0
        if not value.strip().isdigit():
            self.close_connection = True  # where this body ends cannot be known
            raise HTTPFailure(400, f"Content-Length {value!r} is not a number of bytes")
        return int(value)

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.unread:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
        if self.unread:
            self._discard_body()

    def _discard_body(self) -> None:
        """Read and drop the body of a refused request. Closing a socket with unread data sends a reset, and a
        client still sending its body would then see a dropped connection instead of this answer."""
        self.wfile.flush()
        self.connection.settimeout(2)
        left = min(self.unread, 16 * MAX_BODY)
        try:
            while left > 0:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass


# What a request holds ------------------------------------------------------------------------------------------


def reward_request(body: bytes) -> list[str]:
    """The queries of a /get_reward body; HTTPFailure (400 or 413) says what is wrong with it."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HTTPFailure(400, f"the body is not JSON ({error})")
    if not isinstance(data, dict):
        raise HTTPFailure(400, f"the body is a JSON {type(data).__name__}: expected an object with 'query'")
    if "query" not in data:
        raise HTTPFailure(400, "no 'query': expected {\"query\": [texts], \"prompts\": [texts] (optional)}")
    queries = data["query"]
    if not isinstance(queries, list):
        raise HTTPFailure(400, f"'query' is a {type(queries).__name__}: expected a list of texts")
    if len(queries) > MAX_TEXTS:
        raise HTTPFailure(413, f"{len(queries):,} texts in 'query': at most {MAX_TEXTS:,} a request")
    for name, texts in (("query", queries), ("prompts", data.get("prompts"))):
        if texts is None:
            continue
        if not isinstance(texts, list):
            raise HTTPFailure(400, f"'{name}' is a {type(texts).__name__}: expected a list of texts")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise HTTPFailure(400, f"'{name}'[{index}] is a {type(text).__name__}: expected text")
            if not _encodable(text):
                raise HTTPFailure(400, f"'{name}'[{index}] holds a lone surrogate (\\ud800-\\udfff): not text")
    if data.get("prompts") is not None and len(data["prompts"]) != len(queries):
        raise HTTPFailure(400, f"{len(data['prompts'])} 'prompts' for {len(queries)} 'query' texts: expected one "
                               "prompt per query")
    return queries


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def pm_texts(queries: list[str], chat_format) -> list[str]:
    """The texts the PM scores: each query as it is, or read back into messages and rendered as a transcript."""
    if chat_format is None:
        return queries
    texts = []
    for index, query in enumerate(queries):
        try:
            texts.append(conversation_text(chat_format.parse(query)))
        except ParseError as error:
            raise HTTPFailure(400, f"'query'[{index}] is not a conversation in the --policy chat template: {error}")
    return texts

