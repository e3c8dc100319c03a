"""Reward functions that ask `caictl serve-pm` servers, for TRL, verl and OpenRLHF.

    caictl serve-pm --pm models/pm --port 5000                      # on the machine with the PM

    import caictl.rewards                                           # in the training script
    reward = caictl.rewards.remote_reward("http://10.0.0.5:5000", key_env="CAICTL_PM_KEY")
    trainer = trl.GRPOTrainer(model=..., reward_funcs=[reward], ...)

What goes to the server: one transcript per (prompt, completion), the text `caictl score` reads for that
conversation (caictl.models.pm.conversation_text), so the server must run without --policy. A conversational prompt
(a list of messages) is followed by the completion's last message's content, as given; a text prompt is read as
caictl reads one (a transcript when it starts with "Human:", else one user message) and followed by the completion
with its surrounding whitespace stripped (as caictl.models.pm.comparison_of reads a text prompt and reply).
`transcripts()` is that rule. OpenRLHF's queries, already written by the policy's chat template, go as they are
(`RewardClient.get_reward`) to a server started with --policy.

The frameworks' forms:

- TRL: `remote_reward(...)` for `reward_funcs` (TRL calls it with prompts= and completions=, and logs it under its
  `__name__`); `remote_reward_async(...)`, a coroutine function, for TRL's async reward functions (GRPOTrainer
  awaits every async reward function together on its own event loop; the HTTP runs in a worker thread).
- verl: `compute_score(data_source, solution_str, ground_truth, extra_info=None)` and, for verl's batch reward
  manager, `compute_score_batched(data_sources, solution_strs, ground_truths, extra_infos)`. verl hands over only the
  decoded response: the prompt comes from `extra_info["prompt"]` (text or a list of messages), which the data
  preprocessing must put there. These two module-level functions read the server from the environment:
  CAICTL_REWARD_URL (one URL, or several separated by commas) and CAICTL_REWARD_KEY (the key itself, when the server
  wants one). `verl_compute_score(urls, key_env=None, batched=False)` makes the same function for a given server.
- OpenRLHF: examples/openrlhf_reward_func.py, a `--remote_rm_url path/to/file.py` reward function on
  `RewardClient.get_reward`.

Several servers (one per GPU or machine): the texts go in requests of at most MAX_TEXTS (the server's limit, and
under its body limit), each to the server with the fewest requests in flight. A connection that fails, a time-out,
or an answer 429 / 5xx takes that server out of rotation for a cool-down (doubling while it keeps failing) and the
request goes at once to another; only when every server has failed it does the client wait (exponential backoff
with jitter) and try them all again, max_retries times. Any other answer (400, 401, 413) is the request's own fault
and raises at once.

The key: given key_env, the environment variable of that name holds it and every request carries `Authorization:
Bearer <key>`; a missing variable is an error before anything is sent. The key is never logged, and a pickled
reward function carries the variable's name, not the key (TRL's async rollout worker pickles reward functions into
a child process, which inherits the environment).

Importing this module loads no torch, transformers or caictl stage: it runs inside verl's and OpenRLHF's workers.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from caictl.errors import CaictlError, UsageError

MAX_TEXTS = 1024  # texts a request, at most: serve-pm's limit (caictl.stages.serve_pm.MAX_TEXTS)
MAX_BODY = 15 * 1024 * 1024  # bytes of a request body we send, at most: under serve-pm's 16 MiB, with room
URL_ENV = "CAICTL_REWARD_URL"  # the server(s) of the module-level verl functions
KEY_ENV = "CAICTL_REWARD_KEY"  # the key of the module-level verl functions, when the server wants one
MAX_COOL_DOWN = 60.0  # seconds a failing server stays out of rotation, at most


# TRL --------------------------------------------------------------------------------------------------------------


def remote_reward(urls: str | list[str], key_env: str | None = None, name: str = "caictl_reward",
                  **options) -> RemoteReward:
    """A TRL reward function (`reward_funcs` entry) that scores each (prompt, completion) on the server(s).

    urls: a server's URL (`http://host:port`, or with /get_reward), a comma-separated list, or a list. key_env: the
    environment variable that holds the server's key. name: what TRL logs the reward under. options: RewardClient's
    (timeout, max_retries, backoff, cool_down, concurrency)."""
    return RemoteReward(RewardClient(urls, key_env, **options), name)


def remote_reward_async(urls: str | list[str], key_env: str | None = None, name: str = "caictl_reward",
                        **options) -> AsyncRemoteReward:
    """remote_reward's coroutine form, for TRL's async reward functions (awaited together with the others)."""
    return AsyncRemoteReward(RewardClient(urls, key_env, **options), name)


class RemoteReward:
    """Called as TRL calls a reward function; a class rather than a closure so that it pickles."""

    def __init__(self, client: RewardClient, name: str):
        self.client, self.__name__ = client, name

    def __call__(self, prompts: list, completions: list, **_) -> list[float]:
        return self.client.rewards(transcripts(prompts, completions))


class AsyncRemoteReward(RemoteReward):
    async def __call__(self, prompts: list, completions: list, **_) -> list[float]:
        # A worker thread does the requests and any backoff sleep: the event loop goes on with the other rewards.
        return await asyncio.to_thread(self.client.rewards, transcripts(prompts, completions))


def transcripts(prompts: list, completions: list) -> list[str]:
    """The PM's text for each (prompt, completion) in TRL's forms: conversational (lists of messages) or text."""
    from caictl.data.conversation import prompt_from_text
    from caictl.models.pm import conversation_text

    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions: expected one each")
    texts = []
    for prompt, completion in zip(prompts, completions):
        if isinstance(completion, str):
            response = completion
        else:
            response = completion[-1]["content"]
        if isinstance(prompt, str):
            texts.append(conversation_text(prompt_from_text(prompt), response.strip()))
        else:
            texts.append(conversation_text([dict(message) for message in prompt], response))
    return texts


# verl -------------------------------------------------------------------------------------------------------------


def verl_compute_score(urls: str | list[str], key_env: str | None = None, batched: bool = False, **options):
    """verl's custom reward function on the server(s): `compute_score(data_source, solution_str, ground_truth,
    extra_info=None, **kwargs) -> float`, or with batched=True `compute_score(data_sources, solution_strs,
    ground_truths, extra_infos, **kwargs) -> list[float]` (verl's batch reward manager). Put it in the file that
    verl's custom_reward_function.path names, under the name custom_reward_function.name gives."""
    client = RewardClient(urls, key_env, **options)
    if batched:
        def compute_score(data_sources, solution_strs, ground_truths, extra_infos=None, **_) -> list[float]:
            return _verl_scores(client, solution_strs, extra_infos)
    else:
        def compute_score(data_source, solution_str, ground_truth, extra_info=None, **_) -> float:
            return _verl_scores(client, [solution_str], [extra_info])[0]
    return compute_score


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **_) -> float:
    """verl's custom reward function, the server from CAICTL_REWARD_URL (and the key from CAICTL_REWARD_KEY)."""
    return _verl_scores(_environment_client(), [solution_str], [extra_info])[0]


def compute_score_batched(data_sources, solution_strs, ground_truths, extra_infos=None, **_) -> list[float]:
    """verl's batched custom reward function (reward_model.reward_manager=batch), configured as compute_score."""
    return _verl_scores(_environment_client(), solution_strs, extra_infos)


_environment_clients: dict = {}


def _environment_client() -> RewardClient:
    """The client for the environment's URL and key, made on first use (verl imports the file before it sets up
    its workers' environment)."""
    urls = os.environ.get(URL_ENV)
    if not urls:
        raise UsageError(f"caictl.rewards.compute_score: set {URL_ENV} to the reward server's URL (several: "
                         f"separated by commas), e.g. http://10.0.0.5:5000, or use "
                         "caictl.rewards.verl_compute_score(urls)")
    key_env = KEY_ENV if os.environ.get(KEY_ENV) else None
    if (urls, key_env) not in _environment_clients:
        _environment_clients[urls, key_env] = RewardClient(urls, key_env)
    return _environment_clients[urls, key_env]


def _verl_scores(client: RewardClient, responses, extra_infos) -> list[float]:
    responses = list(responses)
    extra_infos = [None] * len(responses) if extra_infos is None else list(extra_infos)
    if len(extra_infos) != len(responses):
        raise ValueError(f"{len(extra_infos)} extra_infos for {len(responses)} responses: expected one each")
    prompts = []
    for index, extra_info in enumerate(extra_infos):
        prompt = extra_info.get("prompt") if hasattr(extra_info, "get") else None
        if prompt is None:
            raise UsageError(f"caictl.rewards (verl): extra_info of response {index} has no 'prompt'; verl passes "
                             "only the decoded response, so the PM needs the prompt from the data: put it in each "
                             "row's extra_info['prompt'] (text or a list of messages) when preprocessing")
        # Read from parquet, a list of messages is a numpy array of dicts: make it plain lists and dicts.
        prompts.append(prompt if isinstance(prompt, str) else [dict(message) for message in prompt])
    return client.rewards(transcripts(prompts, responses))


# The client -------------------------------------------------------------------------------------------------------


class Server:
    """One reward server: where it is, its load, and when it is back in rotation."""

    def __init__(self, url: str):
        self.url = url
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"reward server URL {url!r}: expected http://host:port (or https://...)")
        self.https, self.host, self.port = parts.scheme == "https", parts.hostname, parts.port
        self.path = parts.path.rstrip("/") or "/get_reward"  # a bare http://host:port means its /get_reward
        self.in_flight = 0
        self.sent = 0
        self.failed = 0
        self.last = "no request yet"  # what its latest request did, for the error when every server fails
        self.failures_in_a_row = 0
        self.out_since = float("-inf")  # time.monotonic() when its cool-down began
        self.out_until = float("-inf")  # and when it ends


class Transient(Exception):
    """A failure another server (or a later try) may not have: a dropped connection, a time-out, 429, 5xx."""


class RewardClient:
    """Asks one or more `caictl serve-pm` servers (OpenRLHF's /get_reward protocol) for rewards."""

    def __init__(self, urls: str | list[str], key_env: str | None = None, timeout: float = 300.0,
                 max_retries: int = 5, backoff: float = 1.0, cool_down: float = 2.0, concurrency: int = 8):
        """timeout: seconds one request may take (a batch of MAX_TEXTS long texts on a busy server takes a while).
        max_retries: rounds of attempts after the first, each trying every server once. backoff: seconds before
        the first retry round, doubling each round. cool_down: seconds a server that failed first stays out of
        rotation. concurrency: requests in flight at once, over every server."""
        if isinstance(urls, str):
            urls = urls.split(",")
        urls = [url.strip() for url in urls if url.strip()]
        if not urls:
            raise UsageError("no reward server URL: give one, e.g. http://127.0.0.1:5000")
        self.servers = [Server(url) for url in urls]
        self.key_env = key_env
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.cool_down, self.concurrency = cool_down, concurrency
        self._setup()

    def _setup(self) -> None:
        self._key = _key(self.key_env)
        self._lock = threading.Lock()  # over every server's counts: batches go out from a thread pool
        self.retries = 0  # retry rounds waited for, over all requests

    def __getstate__(self) -> dict:
        # The key stays out of a pickle: the unpickled client reads it again from key_env.
        return {k: v for k, v in self.__dict__.items() if k not in ("_key", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup()

    def rewards(self, queries: list[str]) -> list[float]:
        """One reward per query (a PM transcript, or with a --policy server the policy's chat text), in order."""
        return self.get_reward(queries)["rewards"]

    def get_reward(self, queries: list[str], prompts: list | None = None, labels: list | None = None) -> dict:
        """The server's answer to OpenRLHF's request, `{"rewards", "scores", "extra_logs"}`, one entry per query
        in each list, whatever number of requests the queries took. prompts and labels go along with their
        queries (the server reads neither)."""
        queries = list(queries)
        for name, paired in (("prompts", prompts), ("labels", labels)):
            if paired is not None and len(paired) != len(queries):
                raise ValueError(f"{len(paired)} {name} for {len(queries)} queries: expected one each")
        sizes = [len(json.dumps([query, prompts[i] if prompts else None, labels[i] if labels else None]))
                 for i, query in enumerate(queries)]  # each query's bytes in a body, near enough
        bodies = []
        for start, end in _batches(sizes):
            body = {"query": queries[start:end]}
            if prompts is not None:
                body["prompts"] = list(prompts[start:end])
            if labels is not None:
                body["labels"] = list(labels[start:end])
            bodies.append(body)
        if len(bodies) <= 1 or self.concurrency <= 1:
            answers = [self._call(body) for body in bodies]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(bodies))) as pool:
                answers = list(pool.map(self._call, bodies))
        merged = {"rewards": [], "scores": [], "extra_logs": {}}
        for answer in answers:
            merged["rewards"] += answer["rewards"]
            merged["scores"] += answer.get("scores", answer["rewards"])
            for name, values in answer.get("extra_logs", {}).items():
                merged["extra_logs"].setdefault(name, []).extend(values if isinstance(values, list) else [values])
        return merged

    def _call(self, body: dict) -> dict:
        """One request on the server with the fewest in flight, failing over to the others; in each round every
        server is tried once, those in rotation first; after max_retries + 1 rounds it gives up."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        tried = set()
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.retries += 1
                # Jittered, so that many rollout workers do not come back in step.
                time.sleep(self.backoff * 2 ** (attempt - 1) * (0.5 + random.random() / 2))
                tried.clear()
            while server := self._pick(tried):
                tried.add(server)
                started = time.monotonic()
                try:
                    answer = self._post(server, data, headers)
                except Transient as failure:
                    self._failed(server, str(failure), started)
                    continue
                finally:
                    with self._lock:
                        server.in_flight -= 1
                self._answered(server)
                if len(answer.get("rewards") or []) != len(body["query"]):
                    raise CaictlError(f"{server.url}: {len(answer.get('rewards') or [])} rewards for "
                                      f"{len(body['query'])} queries")
                return answer
        raise self._gave_up()

    def _post(self, server: Server, data: bytes, headers: dict) -> dict:
        connection_class = http.client.HTTPSConnection if server.https else http.client.HTTPConnection
        connection = connection_class(server.host, server.port, timeout=self.timeout)
        try:
            connection.request("POST", server.path, body=data, headers=headers)
            response = connection.getresponse()
            status, raw = response.status, response.read()
        except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, a broken answer
            raise Transient(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
        finally:
            connection.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {"error": raw[:200].decode(errors="replace")}
        said = answer.get("error", "") if isinstance(answer, dict) else ""
        if status == 429 or status >= 500:
            raise Transient(f"HTTP {status}" + (f": {said}" if said else ""))
        if status in (401, 403):
            advice = (f"check that {self.key_env} holds the key the server printed (or its --api-key-env's)"
                      if self.key_env else "the server wants a key: pass key_env, the environment variable that "
                                           "holds it")
            raise UsageError(f"{server.url}: the key was refused (HTTP {status}); {advice}")
        if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("rewards"), list):
            raise CaictlError(f"{server.url}: request refused (HTTP {status}" + (f": {said})" if said else ")"))
        return answer

    def _pick(self, tried: set) -> Server | None:
        """Of the servers not yet tried in this round and in rotation, the one with the fewest requests in flight
        (then the fewest sent, so that one request at a time still alternates); with none in rotation, the one back
        soonest. None when the round is over."""
        with self._lock:
            now = time.monotonic()
            untried = [s for s in self.servers if s not in tried]
            if not untried:
                return None
            up = [s for s in untried if s.out_until <= now]
            server = min(up, key=lambda s: (s.in_flight, s.sent)) if up else min(untried, key=lambda s: s.out_until)
            server.in_flight += 1
            server.sent += 1
            return server

    def _failed(self, server: Server, why: str, started: float) -> None:
        with self._lock:
            server.failed += 1
            server.last = why
            if started < server.out_since:
                return  # sent before the server went out: the same outage, not a further failure
            server.failures_in_a_row += 1
            server.out_since = time.monotonic()
            server.out_until = server.out_since + min(self.cool_down * 2 ** (server.failures_in_a_row - 1),
                                                      MAX_COOL_DOWN)

    def _answered(self, server: Server) -> None:
        with self._lock:
            server.failures_in_a_row, server.out_until, server.last = 0, float("-inf"), "answered"

    def _gave_up(self) -> CaictlError:
        every = ", ".join(f"{s.url} ({s.last}; {s.failed} of {s.sent} requests failed)" for s in self.servers)
        return CaictlError(f"no reward server answered after {self.max_retries + 1} rounds of attempts: {every}; "
                           "check that `caictl serve-pm` runs there, or raise max_retries")


def _key(key_env: str | None) -> str | None:
    if key_env is None:
        return None
    key = os.environ.get(key_env)
    if not key:
        raise UsageError(f"key_env={key_env!r}: the environment variable {key_env} is not set; set it to the "
                         "server's key (the one `caictl serve-pm` printed at start, or the one in the variable its "
                         "--api-key-env names)")
    return key


def _batches(sizes: list[int]):
    """(start, end) of consecutive requests of at most MAX_TEXTS queries and MAX_BODY bytes (sizes: each query's)."""
    start, total = 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start == MAX_TEXTS or total + size > MAX_BODY):
            yield start, index
            start, total = index, 0
        total += size
    if start < len(sizes):
        yield start, len(sizes)
