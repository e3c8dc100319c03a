r"""serve-pm: a reward server over HTTP for RL at scale (OpenRLHF, TRL's GRPO, verl): a preference model, or the
feedback model as a judge.

    caictl serve-pm --pm models/pm --port 5000 --policy models/sl-cai
    caictl serve-pm --reward judge --judge models/feedback \
        --judge-mode pairwise --reference models/sl-cai \
        --policy models/sl-cai --port 5000

POST /get_reward takes OpenRLHF's remote reward model request, `{"query": [texts], "prompts": [...], "labels": [...]}`
(a query is the whole conversation, prompt and response; prompts, when sent, must pair one to one with the queries and
are not read otherwise; labels are read only by the pairwise judge), and answers `{"rewards": [...], "scores": [...],
"extra_logs": {...}}`, one entry per query in each list: scores (OpenRLHF's dynamic filtering reads them) are the
rewards. extra_logs holds, per query: with the PM, pm_truncated_tokens (tokens each text lost from its front to
--max-length); with the judge, principle (the id of the comparison principle drawn for it) and
judge_truncated_tokens (cut from its questions to fit the judge's context), and in pairwise mode p_ab and p_ba (P(the
query's response is preferred) with it in slot A, and in slot B). GET /health says the server is up, which reward it
serves (the model's content hash, caictl.models.identity, and the constitution's hash), its settings and counters;
it never waits for the model. Errors answer `{"error": "..."}`: 400 for a request that is not of that shape (or a
query that does not parse, or lacks the label the pairwise judge needs), 401 without the key (see below), 413 for
more than MAX_TEXTS texts or a body over MAX_BODY bytes, 404 / 405 for another path or method, 500 when scoring
fails; the server keeps serving.

--reward judge (`caictl ppo --reward judge`'s reward, the same code: caictl.feedback.judge_reward) asks the feedback
model --judge, in-process (hf) or behind --engine openai --base-url URL (a judge on vLLM), under one principle of
--constitution drawn per query: rating, the probability-weighted 1-9 rating mapped to [-1, 1]; pairwise, P(the
response is preferred to a reference reply) - 0.5. The reference reply is the request's labels[i] (OpenRLHF sends a
dataset's label there), else the greedy reply of --reference (the starting policy) to the query's prompt, generated
once per prompt and kept for the last --reference-cache prompts. Without --reference every pairwise query needs its
label: a request with a query lacking one (null or "") is a 400 naming it, as the start-up lines say.

What the reward reads: without --policy, each query as a transcript (caictl.models.pm.conversation_text). With
--policy, each query is text the policy's chat template wrote, as OpenRLHF sends it; it is read back into messages
(caictl.data.chat_format) and scored as their transcript, so a PM reward equals `caictl score` on the same
conversation. A system message equal to the template's default (Qwen2.5 writes one when none is given) reads as
none. The judge reads the messages: the last, the assistant's, is the response.

Who may call (caictl.serving): only this machine on the default loopback --host; any other needs a key, read from the
variable that --api-key-env names, or generated and printed once at start; --insecure serves another host without
a key (a trusted network). With a key every request, /health included, needs `Authorization: Bearer <key>`.

Ctrl-C or SIGTERM stops it gracefully: no new connections, idle kept-alive ones closed, every request already read
scored and answered (DRAIN_SECONDS at most), one that comes after the model thread ended answered 503.

One thread owns the model. Request threads queue their queries and wait; the model thread takes the queries of every
waiting request, up to --batch-size, scores them in one batch, and hands each request its own rewards. Queries from
concurrent requests so share forward passes, with no waiting added: a batch is whatever queued while the previous
one ran. Python's standard library serves HTTP (http.server), so serving adds no dependency.
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

from caictl import serving
from caictl.data.chat_format import ParseError
from caictl.data.conversation import parse_transcript
from caictl.engines import ENGINES
from caictl.errors import UsageError
from caictl.feedback.judge_reward import JUDGE_MODES
from caictl.models import kind as model_kind
from caictl.models.pm import conversation_text
from caictl.options import MODEL_ENGINE, RUNS, SAMPLING, SERVERS, common, option
from caictl.ui import log, summary_table

MAX_TEXTS = 1024  # texts in one request
MAX_BODY = 16 * 1024 * 1024  # bytes of one request body (16 MiB)
DRAIN_SECONDS = 10  # at the end, how long answers already being scored or sent may take
REWARDS = ("pm", "judge")


@dataclass
class ServePMConfig:
    port: int = option(help="TCP port; 0 takes a free one (the URL printed at start says which).", panel=SERVERS)
    reward: str = option("pm", "pm: the preference model --pm scores queries; judge: the feedback model --judge does "
                               "(as `caictl ppo --reward judge`).", MODEL_ENGINE)
    pm: str | None = option(None, "--reward pm: a train-pm output folder.", MODEL_ENGINE)
    judge: str | None = option(None, "--reward judge: the feedback model, a folder or hub id (hf engine) or the "
                                     "server's model name (openai).", MODEL_ENGINE)
    judge_mode: str = option("rating", "--reward judge: rating (1-9, probability-weighted, mapped to [-1, 1]) or "
                                       "pairwise (P(preferred to the reference reply) - 0.5).", MODEL_ENGINE)
    constitution: str = common("constitution", "harmless", help="--reward judge: the comparison principles queries "
                                                                "are judged under, one drawn per query.")
    reference: str | None = option(None, "--judge-mode pairwise: the model (the starting policy) whose greedy reply "
                                         "a query without a label is compared with. Unset: every query needs its "
                                         "label (400 otherwise).", MODEL_ENGINE)
    reference_cache: int = option(4096, "--judge-mode pairwise: prompts whose --reference reply is kept, least "
                                        "recently used dropped first.", MODEL_ENGINE)
    max_new_tokens: int = option(256, "Tokens of a --reference reply.", SAMPLING, settings="stage")
    policy: str | None = option(None, "The policy (folder or hub id) whose chat template wrote the queries: each is "
                                      "read back into messages and scored as their transcript. Unset: a query is "
                                      "a transcript.", MODEL_ENGINE)
    engine: str = common("engine", "hf", help="--reward judge: hf (the judge in-process) or openai (the judge and "
                                              "--reference behind --base-url, e.g. vLLM).")
    compile: bool | None = common("compile", None)
    base_url: str | list[str] | None = common("base_url", None)
    concurrency: int = common("concurrency", 8)
    max_retries: int | None = common("max_retries", None)
    timeout: float | None = common("timeout", None)
    tokenizer: str | None = common("tokenizer", None)
    host: str = option("127.0.0.1", "Address to listen on; any but loopback needs a key (--api-key-env, else "
                                    "one is generated) or --insecure.", SERVERS)
    api_key_env: str | None = option(None, "Read the key every request must send (Authorization: Bearer) from this "
                                           "environment variable.", SERVERS, metavar="NAME")
    insecure: bool = option(False, "Serve a non-loopback --host without a key (a trusted network only).", SERVERS,
                            flag="--insecure")
    batch_size: int = option(32, "Queries per batch, at most, gathered from every waiting request.",
                             MODEL_ENGINE, settings="stage")
    max_length: int = option(512, "--reward pm: tokens of each text the PM reads, kept from the end (as `caictl "
                                  "score`).", MODEL_ENGINE)
    seed: int = common("seed", 0)
    log_every: int = option(0, "A throughput line on stderr every N requests; 0: none.", RUNS)

    def check(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"--port {self.port}: expected 0-65535 (0: any free port)")
        if self.reward not in REWARDS:
            problems.append(f"--reward {self.reward!r}: choose one of {', '.join(REWARDS)}")
        elif self.reward == "pm":
            if not self.pm:
                problems.append("--reward pm needs --pm FOLDER (caictl train-pm output), or use --reward judge "
                                "--judge MODEL")
            # Not --engine: a shared setting (CAICTL_ENGINE, caictl.yaml) that other stages read may set it.
            given = [flag for flag, value in (("--judge", self.judge), ("--reference", self.reference)) if value]
            if given:
                problems.append(f"{', '.join(given)}: read only with --reward judge")
        else:
            if not self.judge:
                problems.append("--reward judge needs --judge MODEL (the feedback model)")
            if self.pm:
                problems.append("--pm is read only with --reward pm")
            if self.judge_mode not in JUDGE_MODES:
                problems.append(f"--judge-mode {self.judge_mode!r}: choose one of {', '.join(JUDGE_MODES)}")
            elif self.reference and self.judge_mode != "pairwise":
                problems.append("--reference is read only with --judge-mode pairwise")
        if self.engine not in ENGINES:
            problems.append(f"--engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.insecure and self.api_key_env is not None:
            problems.append("--insecure serves without a key and --api-key-env sets one: pass one of them")
        for flag, value in (("--batch-size", self.batch_size), ("--max-length", self.max_length),
                            ("--reference-cache", self.reference_cache), ("--max-new-tokens", self.max_new_tokens),
                            ("--concurrency", self.concurrency)):
            if value < 1:
                problems.append(f"{flag} must be at least 1")
        if self.log_every < 0:
            problems.append("--log-every must be 0 (no throughput lines) or more")
        if problems:
            raise UsageError("; ".join(problems))


def run(config: ServePMConfig) -> dict:
    """Serves until Ctrl-C or SIGTERM, then returns the counters."""
    config.check()
    access = serving.access(config.host, config.api_key_env, config.insecure)
    constitution = None
    if config.reward == "pm":
        model_kind.check(config.pm, model_kind.SEQ_CLS, "--pm")
    else:
        from caictl.data.constitution import load_for_stage

        constitution = load_for_stage(config.constitution, [], "comparison")
        if config.engine == "hf":
            model_kind.check(config.judge, model_kind.CAUSAL_LM, "--judge")
            if config.reference:
                model_kind.check(config.reference, model_kind.CAUSAL_LM, "--reference")
    if config.policy:
        model_kind.require(config.policy, "--policy")
    chat_format = _chat_format(config.policy) if config.policy else None
    server = _listen(config)  # before the model loads: a port in use fails in a second, not after the load
    try:
        rater, rows = _rater(config, constitution)
        server.batcher = batcher = Batcher(rater, config.batch_size, config.log_every)
        server.reader = QueryReader(chat_format, rater.items, labels_needed=rater.labels_needed)
        server.access = access
        server.info = {**rater.info, "policy": config.policy, "batch_size": config.batch_size,
                       "max_texts": MAX_TEXTS, "max_body_bytes": MAX_BODY, "access": access.source}
        host, port = server.server_address[:2]
        summary_table("serve-pm", [
            *rows, ("queries", f"--policy {config.policy} chat template, read back into transcripts"
                    if config.policy else "transcripts (no --policy)"),
            ("batch size", config.batch_size), ("access", access.source),
            ("log every", f"{config.log_every} requests" if config.log_every else "off")])
        if rater.labels_needed:
            log("pairwise without --reference: every query needs its reference reply in the request's 'labels'; a "
                "request with a query lacking one is answered 400")
        for line in access.start_lines(host):
            log(line)
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


def _rater(config: ServePMConfig, constitution):
    """What scores the queries (PMRater or JudgeRater), and the summary's rows about it."""
    from caictl.models.identity import identity

    if config.reward == "pm":
        from caictl.models.pm import Scorer

        scorer = Scorer(config.pm, max_length=config.max_length, batch_size=config.batch_size)
        rater = PMRater(scorer)
        rater.info = {"reward": "pm", "pm": config.pm, "model": config.pm, "model_identity": identity(config.pm),
                      "max_length": scorer.max_length}
        return rater, [("reward", "pm"), ("pm", config.pm), ("max length", scorer.max_length),
                       ("device", scorer.device)]
    from caictl.engines.generation import open_engine
    from caictl.feedback.judge_reward import GreedyReplies, JudgeReward

    replies = None
    if config.reference:
        replies = GreedyReplies(open_engine(config, config.reference), config.max_new_tokens)
    judge = JudgeReward(open_engine(config, config.judge), constitution, config.judge_mode, config.seed, replies,
                        cache=config.reference_cache)
    rater = JudgeRater(judge)
    rater.info = {"reward": "judge", "judge": config.judge, "model": config.judge,
                  "model_identity": identity(config.judge, config.engine), "engine": config.engine,
                  "judge_mode": config.judge_mode, "constitution": constitution.name,
                  "constitution_hash": constitution.content_hash(), "seed": config.seed}
    if config.judge_mode == "pairwise":
        rater.info.update(reference=config.reference, reference_cache=config.reference_cache,
                          reference_identity=identity(config.reference, config.engine) if config.reference else None)
    reference = (f"{config.reference} greedy, {config.max_new_tokens} tokens, last {config.reference_cache} "
                 "prompts kept; a request's labels first" if config.reference else "the request's labels only")
    return rater, [("reward", f"judge, {config.judge_mode}"), ("judge", f"{config.judge} ({config.engine})"),
                   ("constitution", f"{constitution.name} (hash {constitution.content_hash()})"),
                   *([("reference", reference)] if config.judge_mode == "pairwise" else [])]


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


# What scores a batch -------------------------------------------------------------------------------------------


class PMRater:
    """The preference model's reward for each text, and what each lost to --max-length."""

    items = "texts"  # what QueryReader makes of the queries
    labels_needed = False

    def __init__(self, scorer):
        self.scorer, self.info = scorer, {}

    def __call__(self, texts: list[str]) -> tuple[list[float], list[dict]]:
        return self.scorer.score(texts), [{"pm_truncated_tokens": cut} for cut in self.scorer.cut_tokens(texts)]

    def log_keys(self) -> tuple[str, ...]:
        return ("pm_truncated_tokens",)

    def health(self) -> dict:
        return {}


class JudgeRater:
    """The feedback model's reward for each (prompt, response, label), as `caictl ppo --reward judge` computes it,
    with the principle drawn and, pairwise, both orders' probabilities."""

    # JudgeReward.rate()'s names -> extra_logs' (truncated_tokens says whose, as pm_truncated_tokens does)
    LOGGED = {"principle": "principle", "truncated_tokens": "judge_truncated_tokens", "p_ab": "p_ab", "p_ba": "p_ba"}

    def __init__(self, reward):
        self.reward, self.info = reward, {}
        self.items = "pairs" if reward.mode == "pairwise" else "conversations"  # only pairs read labels
        self.labels_needed = reward.mode == "pairwise" and reward.reference is None

    def __call__(self, items: list[tuple[list[dict], str, str | None]]) -> tuple[list[float], list[dict]]:
        prompts, responses, labels = (list(column) for column in zip(*items))
        rows = self.reward.rate(prompts, responses, labels if self.reward.mode == "pairwise" else None)
        logs = [{self.LOGGED[name]: value for name, value in row.items() if name in self.LOGGED} for row in rows]
        return [row["reward"] for row in rows], logs

    def log_keys(self) -> tuple[str, ...]:
        return ("principle", "judge_truncated_tokens") + (("p_ab", "p_ba") if self.reward.mode == "pairwise" else ())

    def health(self) -> dict:
        if self.reward.mode != "pairwise":
            return {}
        # Read without a lock, as the model thread changes them: each is one attribute read, never a wait.
        return {"references_generated": self.reward.generated, "references_cached": len(self.reward.references)}


# Batching ------------------------------------------------------------------------------------------------------


class Request:
    """One HTTP request's queries (texts for the PM, conversations for the judge) and, once scored, one reward and
    one dict of extra logs per query, in its order."""

    def __init__(self, texts: list):
        self.texts = texts
        self.rewards: list = [None] * len(texts)
        self.logs: list = [None] * len(texts)
        self.left = len(texts)  # queries not scored yet
        self.error: str | None = None
        self.done = threading.Event()


class ScoringError(Exception):
    pass


class Stopping(Exception):
    """The model thread has ended: a request that comes after it is refused, never left waiting."""


_STOP = object()


class Batcher:
    """The model's one thread and the queue of (request, query index) that feeds it. rater: a PMRater or JudgeRater,
    called with a batch's queries and only from the model thread."""

    def __init__(self, rater, batch_size: int, log_every: int = 0):
        self.rater, self.batch_size, self.log_every = rater, batch_size, log_every
        self.queue = queue.SimpleQueue()
        self.stats = Stats()
        self.stopping, self.stop_lock = False, threading.Lock()
        self.thread = threading.Thread(target=self._work, name="caictl-pm", daemon=True)
        self.thread.start()

    def score(self, texts: list) -> tuple[list[float], list[dict]]:
        """(rewards, extra logs) of the queries, in order, once the model thread has scored them all."""
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
        return request.rewards, request.logs

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
            rewards, logs = self.rater(texts)
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
        for (request, index), reward, logged in zip(batch, rewards, logs):
            request.rewards[index], request.logs[index] = reward, logged
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
                                     "most_requests_in_a_batch", "rejected", "unauthorized", "failed"), 0)

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
    reader: QueryReader
    access = serving.Access(None, "none")
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
            if not self.server.access.allows(self.headers.get("Authorization")):
                raise HTTPFailure(401, "this server needs `Authorization: Bearer <key>` on every request (the key "
                                       "that its --api-key-env names, or the one it printed at start)")
            if path not in routes:
                raise HTTPFailure(404, f"no such path {path!r}: POST /get_reward, GET /health")
            if method != routes[path][0]:
                raise HTTPFailure(405, f"{path} takes {routes[path][0]}, not {method}")
            self._send(200, routes[path][1]())
        except HTTPFailure as failure:
            if failure.status == 401:
                self.server.batcher.stats.count(unauthorized=1)
            elif failure.status < 500:
                self.server.batcher.stats.count(rejected=1)
            self._send(failure.status, {"error": failure.message})

    def _health(self) -> dict:
        """Settings and counters only: nothing here waits for the model thread, so a busy model (or a slow judge
        behind --engine openai) never holds up a health check."""
        batcher = self.server.batcher
        return {"status": "ok", **self.server.info, **batcher.stats.snapshot(), **batcher.rater.health()}

    def _get_reward(self) -> dict:
        if self.unread > MAX_BODY:
            raise HTTPFailure(413, f"body of {self.unread:,} bytes: at most {MAX_BODY:,} (send fewer texts a request)")
        body, self.unread = self.rfile.read(self.unread), 0
        items = self.server.reader(reward_request(body))
        batcher = self.server.batcher
        try:
            rewards, logs = batcher.score(items)
        except ScoringError as error:
            raise HTTPFailure(500, str(error))
        except Stopping as error:
            raise HTTPFailure(503, f"{error}: send the request to another server")
        extra_logs = {key: [logged[key] for logged in logs] for key in batcher.rater.log_keys()}
        return {"rewards": rewards, "scores": rewards, "extra_logs": extra_logs}

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
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
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


def reward_request(body: bytes) -> dict:
    """The queries and labels of a /get_reward body, as {"query": [...], "labels": [...] or None}; HTTPFailure (400
    or 413) says what is wrong with it. Labels are checked where they are read (QueryReader)."""
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
    return {"query": queries, "labels": data.get("labels")}


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class QueryReader:
    """What the rater scores, from a request: the PM's texts ("texts"), or the judge's (prompt, response, label)
    triples ("conversations", labels None; "pairs", labels read)."""

    def __init__(self, chat_format=None, items: str = "texts", labels_needed: bool = False):
        self.chat_format, self.items, self.labels_needed = chat_format, items, labels_needed

    def __call__(self, request: dict) -> list:
        if self.items == "texts":
            return pm_texts(request["query"], self.chat_format)
        conversations = [self._messages(index, query) for index, query in enumerate(request["query"])]
        labels = [None] * len(conversations)
        if self.items == "pairs":
            labels = judge_labels(request.get("labels"), len(conversations), self.labels_needed)
        return [(messages[:-1], messages[-1]["content"], label) for messages, label in zip(conversations, labels)]

    def _messages(self, index: int, query: str) -> list[dict]:
        if self.chat_format is None:
            messages = parse_transcript(query)
            where = "transcript"
        else:
            try:
                messages = self.chat_format.parse(query)
            except ParseError as error:
                raise HTTPFailure(400, f"'query'[{index}] is not a conversation in the --policy chat template: "
                                       f"{error}")
            where = "--policy chat template"
        if not messages or messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
            raise HTTPFailure(400, f"'query'[{index}] does not end with an assistant's response to a user ({where}): "
                                   "the judge rates the last response")
        return messages


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


def judge_labels(labels, count: int, needed: bool) -> list[str | None]:
    """Each query's reference reply for the pairwise judge: its label, None where none came (null or ""). needed:
    the server has no --reference, so a missing one is a 400 naming every query that lacks it."""
    if labels is None:
        labels = [None] * count
    if not isinstance(labels, list):
        raise HTTPFailure(400, f"'labels' is a {type(labels).__name__}: expected a list, one reference reply per query")
    if len(labels) != count:
        raise HTTPFailure(400, f"{len(labels)} 'labels' for {count} 'query' texts: expected one label per query")
    for index, label in enumerate(labels):
        if label is not None and not isinstance(label, str):
            raise HTTPFailure(400, f"'labels'[{index}] is a {type(label).__name__}: expected the reference reply "
                                   "as text (or null)")
        if isinstance(label, str) and not _encodable(label):
            raise HTTPFailure(400, f"'labels'[{index}] holds a lone surrogate (\\ud800-\\udfff): not text")
    labels = [label or None for label in labels]
    missing = [index for index, label in enumerate(labels) if label is None]
    if needed and missing:
        shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise HTTPFailure(400, f"'labels'[{shown}] missing: this pairwise judge has no --reference model, so each "
                               "query needs its reference reply in 'labels'")
    return labels
