"""Any OpenAI-compatible server: vLLM serve, TGI, llama.cpp, Ollama, hosted APIs.

    caictl revise prompts.jsonl --engine openai --base-url http://127.0.0.1:8000/v1 --model my-model

Every text caictl sends is content: a piece of it shaped like a control token (`<|im_end|>`, `</s>`) is broken
with an invisible word joiner (caictl.data.control_text.defuse), because servers parse control tokens in any text
they get.
Requests run concurrently under a limit; 429s, 5xx answers, time-outs and dropped connections are retried
with exponential backoff (honouring Retry-After). The key comes from OPENAI_API_KEY and is never logged or
written anywhere.

Given several servers (one per GPU or machine), each request goes to the server with the fewest requests in
flight. A server that fails a request in one of those ways is left out of rotation for a cool-down and the
request goes at once to another; the backoff above applies only when every server has failed it. The seed
travels with the request, so servers that answer a seeded request alike (llama.cpp's do: tests/test_multi_server.py)
give the same text whichever of them answers.
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from caictl.data.control_text import defuse
from caictl.engines.base import ChoiceScores, Generation, SamplingParams, cut_at_stop, request_seed
from caictl.errors import CaictlError, UsageError
from caictl.ui import log

# The OpenAI API takes at most four stop strings; the rest are applied to the text afterwards.
MAX_SERVER_STOPS = 4
# A failing server's cool-down doubles with each failure in a row, up to this many seconds.
MAX_COOL_DOWN = 60.0


class Server:
    """One server of the engine's: its client, its load, what it has done, and when it is back in rotation."""

    def __init__(self, url: str, client):
        self.url, self.client = url, client
        self.in_flight = 0
        self.sent = 0  # requests sent, failed ones included
        self.failed = 0  # requests that failed on 429, 5xx, a time-out or a dropped connection
        self.last = "no request yet"  # what its latest request did, for the error when every server fails
        self.failures_in_a_row = 0
        self.out_since = float("-inf")  # time.monotonic() when its cool-down began
        self.out_until = float("-inf")  # and when it ends


class OpenAIEngine:
    name = "openai"

    def __init__(self, model: str, base_url: str | list[str] | None = None, concurrency: int = 8,
                 max_retries: int = 6, timeout: float = 120.0, backoff: float = 1.0, cool_down: float = 2.0):
        import openai

        # One URL or several; the command line's forms (repeated flag, commas, caictl.yaml list) are turned into
        # this list by caictl.settings.base_urls.
        urls = [base_url] if isinstance(base_url, str) else list(base_url or [])
        if not urls:
            raise UsageError("--engine openai needs --base-url (or CAICTL_BASE_URL), e.g. http://127.0.0.1:8000/v1")
        self.model = model
        self.concurrency = concurrency  # in flight in all, over every server
        self.max_retries = max_retries
        self.backoff = backoff
        self.cool_down = cool_down  # seconds a server that failed a request first stays out of rotation
        # Retries are ours (below), so that what is retried and how long we wait is explicit and logged.
        key = os.environ.get("OPENAI_API_KEY") or "none"
        self.servers = [Server(url, openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=timeout))
                        for url in urls]
        self._lock = threading.Lock()  # over every server's counts: requests run from a thread pool
        self.retries = 0  # requests retried after a backoff, for the summary

    def supports_chat(self) -> bool:
        return True

    def generate(self, chats: list[list[dict]], params: SamplingParams, keys: list[str]) -> list[Generation]:
        def one(chat, key):
            # Content is text: the server's template renders it and its tokenizer would read control tokens in it.
            chat = [{k: defuse(v) if isinstance(v, str) else v for k, v in m.items()} for m in chat]
            response, _ = self._call(lambda client: client.chat.completions.create(
                messages=chat, **self._sampling(params, key)))
            choice = response.choices[0]
            return self._result(choice.message.content or "", choice.finish_reason, response.usage, params)

        return self._map(one, chats, keys)

    def complete(self, texts: list[str], params: SamplingParams, keys: list[str]) -> list[Generation]:
        def one(text, key):
            response, _ = self._call(lambda client: client.completions.create(
                prompt=defuse(text), **self._sampling(params, key)))
            choice = response.choices[0]
            return self._result(choice.text or "", choice.finish_reason, response.usage, params)

        return self._map(one, texts, keys)

    def chat_prompt(self, chat: list[dict]) -> None:
        return None  # the server applies its own template; scoring goes through /v1/completions text

    def choice_logprobs(self, texts: list[str], choices: list[str]) -> ChoiceScores:
        """Log-prob of each choice as the continuation of each text, from the server's echoed prompt
        log-probs (/v1/completions with echo): one scoring request per (text, choice), nothing sampled. Nothing
        is cut: a server refuses a text too long for its context."""

        def one(pair, key):
            text, choice = defuse(pair[0]), defuse(pair[1])
            response, url = self._call(lambda client: client.completions.create(
                model=self.model, prompt=text + choice, max_tokens=1, temperature=0.0, logprobs=1, echo=True))
            logprobs = response.choices[0].logprobs
            if not logprobs or not logprobs.token_logprobs or not logprobs.text_offset:
                raise CaictlError(
                    f"server at {url} returned no prompt log-probs for model {self.model!r}; scoring "
                    "needs /v1/completions with `echo` and `logprobs` (vLLM, llama.cpp server)"
                )
            # The echo covers prompt tokens then the one generated token: score the prompt tokens that
            # reach into the choice (a token spanning the boundary counts, the same way for every choice).
            end = len(text + choice)
            total = 0.0
            for token, offset, logprob in zip(logprobs.tokens, logprobs.text_offset, logprobs.token_logprobs):
                if offset >= end:
                    break
                if offset + len(token) > len(text) and logprob is not None:
                    total += logprob
            return total

        pairs = [(text, choice) for text in texts for choice in choices]
        flat = self._map(one, pairs, [""] * len(pairs))
        return ChoiceScores.uncut([flat[t * len(choices):(t + 1) * len(choices)] for t in range(len(texts))])

    # Internals ------------------------------------------------------------------------------------------

    def _sampling(self, params: SamplingParams, key: str) -> dict:
        options = {"model": self.model, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                   "seed": request_seed(params.seed, key) % (2**31)}
        if params.top_p < 1.0:
            options["top_p"] = params.top_p
        if params.stop:
            options["stop"] = list(params.stop[:MAX_SERVER_STOPS])
        return options

    def _result(self, text: str, finish_reason, usage, params: SamplingParams) -> Generation:
        text, stopped = cut_at_stop(text, params.stop)
        finish = "stop" if stopped or finish_reason == "stop" else "length"
        prompt_tokens = getattr(usage, "prompt_tokens", 0) or 0
        completion_tokens = getattr(usage, "completion_tokens", 0) or 0
        return Generation(text, prompt_tokens, completion_tokens, finish)

    def _map(self, one, items: list, keys: list[str]) -> list:
        if len(items) <= 1 or self.concurrency <= 1:
            return [one(item, key) for item, key in zip(items, keys)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(one, items, keys))

    def _call(self, request):
        """request(client) on the server with the fewest requests in flight, failing over to the others; returns
        (the response, the URL of the server that gave it). Retries count rounds: in each, every server is tried
        once, those in rotation first, so with one server a round is one attempt; the run stops when every server
        has failed the request max_retries + 1 times."""
        import openai

        tried, error = set(), None
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.retries += 1
                time.sleep(self._wait(attempt - 1, error))
                tried.clear()
            while server := self._pick(tried):
                tried.add(server)
                started = time.monotonic()
                try:
                    response = request(server.client)
                except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                        openai.APIConnectionError) as failure:
                    error = failure
                    self._failed(server, failure, started)
                    continue
                # The request's own fault (a bad key, model or request): another server would refuse it too.
                except openai.AuthenticationError:
                    raise UsageError(f"{server.url}: authentication failed; set OPENAI_API_KEY to a valid key")
                except openai.NotFoundError as failure:
                    raise UsageError(f"{server.url}: not found ({_describe(failure)}); "
                                     "check --model and --base-url")
                except openai.APIStatusError as failure:
                    raise CaictlError(f"{server.url}: request refused ({_describe(failure)})")
                finally:
                    with self._lock:
                        server.in_flight -= 1
                self._answered(server)
                return response, server.url
        raise self._gave_up(error)

    def _pick(self, tried: set) -> Server | None:
        """The server not yet tried in this round: of those in rotation, the one with the fewest requests in flight
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

    def _failed(self, server: Server, error, started: float) -> None:
        with self._lock:
            server.failed += 1
            server.last = _describe(error)
            if started < server.out_since:
                return  # sent before the server went out: the same outage, not a further failure
            server.failures_in_a_row += 1
            seconds = min(self.cool_down * 2 ** (server.failures_in_a_row - 1), MAX_COOL_DOWN)
            server.out_since = time.monotonic()
            server.out_until = server.out_since + seconds
        if len(self.servers) > 1:
            log(f"{server.url}: {server.last}; out of rotation for {seconds:g} s")

    def _answered(self, server: Server) -> None:
        with self._lock:
            was_out, server.failures_in_a_row = server.failures_in_a_row, 0
            server.out_until = float("-inf")
            server.last = "answered"
        if was_out and len(self.servers) > 1:
            log(f"{server.url}: answering again, back in rotation")

    def _gave_up(self, error) -> CaictlError:
        advice = "raise --max-retries (or --timeout, for a slow one)"
        if len(self.servers) == 1:
            return CaictlError(f"{self.servers[0].url}: gave up after {self.max_retries + 1} attempts "
                               f"({_describe(error)}); check the server, or {advice}")
        every = ", ".join(f"{s.url} ({s.last}; {s.failed} of {s.sent} requests failed)" for s in self.servers)
        return CaictlError(f"every server failed: {every}; gave up after {self.max_retries + 1} rounds of "
                           f"attempts; check the servers, or {advice}")

    def _wait(self, attempt: int, error) -> float:
        response = getattr(error, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after:
            try:
                return min(float(retry_after), 60.0)
            except ValueError:
                pass
        # Exponential backoff with jitter, so that many workers do not retry in step.
        return self.backoff * (2**attempt) * (0.5 + random.random() / 2)


def _describe(error) -> str:
    status = getattr(error, "status_code", None)
    return f"HTTP {status}" if status else type(error).__name__
