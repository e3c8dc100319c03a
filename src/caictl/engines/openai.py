"""Any OpenAI-compatible server: vLLM serve, TGI, llama.cpp, Ollama, hosted APIs.

    caictl revise prompts.jsonl --engine openai --base-url http://127.0.0.1:8000/v1 --model my-model

Token-exact prompts: given the model's tokenizer (`tokenizer`, else `model` when it is a local folder or a hub id
already in the local cache; nothing is downloaded), the engine renders every request itself, as the hf engine does
(chats through the template with their content as data, caictl.data.control_text.ContentEncoder) and sends token
ids to /v1/completions (`prompt` as a list of ints): the server reads exactly the ids the hf engine would feed its
model, and a control token inside content stays text. A chat's reply then ends where the server ends generation
(its end-of-sequence / end-of-generation tokens). Before any request the tokenizer is checked against each server
(its tokenize endpoint on a probe text, else the vocabulary size it reports; a mismatch is refused), and a one-token
probe finds out whether the server takes token ids at all. Choice log-probs read the same ids as the hf engine:
echoed prompt log-probs where the server gives them (vLLM), else one forced one-token completion per choice token
(llama.cpp's llama-server, which refuses or ignores `echo`; see _forced_logprob).

Text prompts: without a tokenizer, or from a server that refuses token-id prompts (llama-cpp-python's), every
text is sent as content: a piece of it shaped like a control token (`<|im_end|>`, `</s>`) is broken with an
invisible word joiner (caictl.data.control_text.defuse), because servers parse control tokens in any text they
get. The engine says so once on stderr; prompt_meta() records which form was used, for every row.

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

import contextlib
import os
import random
import threading
import time
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from caictl.data.control_text import defuse, mark, unmark
from caictl.engines.base import ChoiceScores, Generation, SamplingParams, cut_at_stop, request_seed, stop_ids
from caictl.errors import CaictlError, UsageError
from caictl.ui import log

# The OpenAI API takes at most four stop strings; the rest are applied to the text afterwards.
MAX_SERVER_STOPS = 4
# A failing server's cool-down doubles with each failure in a row, up to this many seconds.
MAX_COOL_DOWN = 60.0
# What the tokenizer and a server must read alike: words, digits, spaces, several scripts and an emoji, and no
# control token (llama-server's tokenize endpoint parses them).
PROBE = "Tokenizer check: Hello, world!  1234 ½ café naïve 日本語 Привет 🙂\n\n\tdone."
# The logit bias that makes a server pick the one token a scoring request asks about (llama.cpp applies it as a
# sampling stage, after it has read the token's log-prob from the raw logits).
FORCE_BIAS = 100
TEXT_PROMPTS = "prompts go as text, each piece shaped like a control token broken by a word joiner (U+2060)"


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
                 max_retries: int = 6, timeout: float = 120.0, backoff: float = 1.0, cool_down: float = 2.0,
                 tokenizer: str | None = None):
        """tokenizer: the served model's tokenizer (a local folder or a hub id in the local cache) for token-id
        prompts; None: `model` where it is one of those, else text prompts."""
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
        self.text_prompt_requests = 0  # requests whose prompt went as text (defused), for the summary
        self.prompt_form = "text-defused"  # or "ids", once the servers are found to take the tokenizer's ids
        self.fallback: str | None = None  # why a tokenizer's ids are not sent, when a server refused them
        self._identity: str | None = None
        self._scoring: str | None = None  # "echo" or "forced": how choice log-probs are read, found on first use
        self.tokenizer_name = tokenizer or _cached_tokenizer(model)
        self.encoder, self._vocab_sizes = None, set()  # the sizes a server of the tokenizer's model may report
        if self.tokenizer_name:
            self.encoder, self._vocab_sizes = _content_encoder(self.tokenizer_name)
        if self.encoder is None:
            log(f"openai engine: no tokenizer for {model!r} (pass --tokenizer: a local folder or a cached hub id); "
                f"{TEXT_PROMPTS}")
        else:
            self._check_servers()

    def supports_chat(self) -> bool:
        return self.prompt_form != "ids" or self._has_template()

    def generate(self, chats: list[list[dict]], params: SamplingParams, keys: list[str]) -> list[Generation]:
        if self.prompt_form == "ids":
            if not self._has_template():
                raise UsageError(f"tokenizer {self.tokenizer_name!r} has no chat template; use --prompt-style "
                                 "transcript")
            return self._complete_ids(self.encoder.encode([self.chat_prompt(chat) for chat in chats]), params, keys)

        def one(chat, key):
            # Content is text: the server's template renders it and its tokenizer would read control tokens in it.
            chat = [{k: defuse(v) if isinstance(v, str) else v for k, v in m.items()} for m in chat]
            self._sent_as_text()
            response, _ = self._call(lambda client: client.chat.completions.create(
                messages=chat, **self._sampling(params, key)))
            choice = response.choices[0]
            return self._result(choice.message.content or "", choice.finish_reason, response.usage, params)

        return self._map(one, chats, keys)

    def complete(self, texts: list[str], params: SamplingParams, keys: list[str]) -> list[Generation]:
        if self.prompt_form == "ids":
            return self._complete_ids(self.encoder.encode(texts), params, keys)

        def one(text, key):
            self._sent_as_text()
            response, _ = self._call(lambda client: client.completions.create(
                prompt=defuse(text), **self._sampling(params, key)))
            choice = response.choices[0]
            return self._result(choice.text or "", choice.finish_reason, response.usage, params)

        return self._map(one, texts, keys)

    def chat_prompt(self, chat: list[dict]) -> str | None:
        """With token-id prompts, the text the model sees for a chat (as the hf engine renders it, content marked);
        else None: the server applies its own template, and scoring goes through /v1/completions text."""
        if self.prompt_form != "ids" or not self._has_template():
            return None
        return self.encoder.render(chat, add_generation_prompt=True)

    def choice_logprobs(self, texts: list[str], choices: list[str]) -> ChoiceScores:
        """Log-prob of each choice as the continuation of each text, nothing sampled. Nothing is cut: a server
        refuses a text too long for its context. With token ids, the choice's tokens are those the hf engine scores
        (text and choice encoded together; a token across the boundary counts) and each is read as the hf engine
        reads it; with text, from the server's echoed prompt log-probs, one request per (text, choice)."""
        if self.prompt_form != "ids":
            return self._text_choice_logprobs(texts, choices)
        if not choices or not texts:
            return ChoiceScores.uncut([[] for _ in texts])
        reads = self._choice_reads(texts, choices)
        flat = [None] * len(reads)
        if self._scoring is None:  # the first scoring request decides how every later one is read
            flat[0] = self._echo_logprob(*reads[0])
            self._scoring = "forced" if flat[0] is None else "echo"
        if self._scoring == "echo":
            rest = [i for i, value in enumerate(flat) if value is None]
            for i, value in zip(rest, self._map(lambda read, _: self._echo_logprob(*read, required=True),
                                                [reads[i] for i in rest], [""] * len(rest))):
                flat[i] = value
        else:
            # One request per distinct (prefix, token): choices that start alike share their first tokens' reads.
            wanted = list(dict.fromkeys((tuple(ids[:i]), ids[i]) for ids, start in reads
                                        for i in range(start, len(ids))))
            got = dict(zip(wanted, self._map(lambda pair, _: self._forced_logprob(*pair), wanted,
                                             [""] * len(wanted))))
            flat = [sum(got[tuple(ids[:i]), ids[i]] for i in range(start, len(ids))) for ids, start in reads]
        return ChoiceScores.uncut([flat[t * len(choices):(t + 1) * len(choices)] for t in range(len(texts))])

    def prompt_meta(self) -> dict:
        """How this engine's prompts reach the model, for every row's meta: the prompt form, the tokenizer's
        identity (caictl.models.identity) or None, and why a tokenizer's ids are not sent, where they are not."""
        from caictl.models.identity import identity

        if self.tokenizer_name and self._identity is None:
            self._identity = identity(self.tokenizer_name)
        meta = {"prompt_form": self.prompt_form, "tokenizer": self._identity}
        if self.fallback:
            meta["prompt_form_fallback"] = self.fallback
        return meta

    # Token ids ------------------------------------------------------------------------------------------

    def _check_servers(self) -> None:
        """Each server reads the probe text as the tokenizer does (or has its vocabulary size) and takes a
        token-id prompt; the first that refuses token ids sends every request as text."""
        expected = self.encoder.tokenizer(PROBE, add_special_tokens=False).input_ids
        unchecked = []
        for server in self.servers:
            served = self._served_ids(server, PROBE)
            if served is not None and served != expected:
                raise UsageError(
                    f"tokenizer {self.tokenizer_name!r} does not match the server at {server.url} (model "
                    f"{self.model!r}): it reads a probe text as {_shown(expected)}, the server as {_shown(served)}; "
                    "pass the served model's tokenizer with --tokenizer")
            if served is None:
                size = self._served_vocab_size(server)
                if size is not None and size not in self._vocab_sizes:
                    raise UsageError(
                        f"tokenizer {self.tokenizer_name!r} does not match the server at {server.url} (model "
                        f"{self.model!r}): {len(self.encoder.tokenizer)} tokens, the server's vocabulary {size}; "
                        "pass the served model's tokenizer with --tokenizer")
                if size is None:
                    unchecked.append(server.url)
            refused = self._refuses_ids(server, expected)
            if refused:
                self.fallback = refused
                log(f"openai engine: {refused}; {TEXT_PROMPTS}")
                return
        if unchecked:
            log(f"openai engine: tokenizer {self.tokenizer_name!r} not checked against {', '.join(unchecked)} "
                "(no tokenize endpoint, no vocabulary size); token-id prompts assume it is the served model's")
        self.prompt_form = "ids"

    def _served_ids(self, server: Server, text: str) -> list[int] | None:
        """The ids the server reads `text` as, without special tokens; None where it has no tokenize endpoint."""
        root = server.url.rstrip("/").removesuffix("/v1")
        body = {"content": text, "add_special": False,  # llama.cpp's llama-server
                "model": self.model, "prompt": text, "add_special_tokens": False}  # vLLM
        answer = self._call(_optional(lambda client: client.post(root + "/tokenize", body=body, cast_to=object)),
                            server)[0]
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if isinstance(tokens, list) and all(isinstance(t, int) for t in tokens):
            return tokens
        return None

    def _served_vocab_size(self, server: Server) -> int | None:
        """The vocabulary size the server reports for the model (llama-server's /v1/models `meta`), or None."""
        answer = self._call(_optional(lambda client: client.get("/models", cast_to=object)), server)[0]
        entries = [e for e in answer.get("data") or [] if isinstance(e, dict)] if isinstance(answer, dict) else []
        named = [e for e in entries if e.get("id") == self.model] or entries
        sizes = {e["meta"].get("n_vocab") for e in named if isinstance(e.get("meta"), dict)} - {None}
        return sizes.pop() if len(sizes) == 1 else None

    def _refuses_ids(self, server: Server, ids: list[int]) -> str | None:
        """Why the server refuses a token-id prompt (a one-token completion), or None where it answers. A refusal
        is an answer, not a failure: it is not retried."""
        import openai

        def probe(client):
            try:
                client.completions.create(model=self.model, prompt=ids, max_tokens=1, temperature=0.0)
            except openai.APIStatusError as error:
                everything = f"{error.message} {error.body}".lower()  # an error's `param` may name the field
                if "prompt" in everything or "validation" in everything:
                    return f"{server.url} refused a token-id prompt ({_describe(error)}: {_first_line(_said(error))})"
                raise
            return None

        return self._call(probe, server)[0]

    def _complete_ids(self, prompts: list[list[int]], params: SamplingParams, keys: list[str]) -> list[Generation]:
        def one(ids, key):
            response, _ = self._call(lambda client: client.completions.create(
                prompt=ids, **self._sampling(params, key)))
            choice = response.choices[0]
            return self._result(choice.text or "", choice.finish_reason, response.usage, params)

        return self._map(one, prompts, keys)

    def _choice_reads(self, texts: list[str], choices: list[str]) -> list[tuple[list[int], int]]:
        """Per (text, choice), in that order: the ids of text and choice encoded together, and where the tokens
        scored begin (as hf's choice_rows finds them; the first token, which nothing comes before, never)."""
        encoded = self.encoder.encode_with_offsets([text + mark(choice) for text in texts for choice in choices])
        reads = []
        for index, (ids, offsets) in enumerate(encoded):
            text, choice = texts[index // len(choices)], choices[index % len(choices)]
            start = bisect_right(offsets, len(unmark(text)), key=lambda span: span[1])
            if start == len(ids):
                raise UsageError(f"choice {choice!r} adds no token to the text it follows")
            reads.append((ids, max(start, 1)))
        return reads

    def _echo_logprob(self, ids: list[int], start: int, required: bool = False) -> float | None:
        """The summed log-probs of ids[start:] from the server's echoed prompt log-probs (vLLM). None where the
        server refuses `echo` (llama.cpp's llama-server did) or answers without prompt log-probs (it now ignores
        `echo`), unless `required`: then an error."""
        import openai

        def ask(client):
            try:
                return client.completions.create(model=self.model, prompt=ids, max_tokens=1, temperature=0.0,
                                                 logprobs=1, echo=True)
            except openai.APIStatusError as error:
                if "echo" in f"{error.message} {error.body}".lower() and not required:
                    return None
                raise

        response, url = self._call(ask)
        logprobs = response.choices[0].logprobs if response is not None else None
        values = getattr(logprobs, "token_logprobs", None) or []
        scored = values[start:len(ids)]
        if len(values) < len(ids) or any(value is None for value in scored):
            if required:
                raise CaictlError(f"server at {url} returned no prompt log-probs for model {self.model!r}")
            return None
        return sum(scored)

    def _forced_logprob(self, prefix: tuple[int, ...], token: int) -> float:
        """log p(token | prefix) from a one-token completion that the logit bias forces to pick `token`:
        llama-server reports the picked token's log-prob from the raw logits over the whole vocabulary
        (server-common.cpp get_token_probabilities), before any sampling stage, the bias included."""
        response, url = self._call(lambda client: client.completions.create(
            model=self.model, prompt=list(prefix), max_tokens=1, temperature=0.0, logprobs=1,
            logit_bias={str(token): FORCE_BIAS}))
        logprobs = response.choices[0].logprobs
        entry = (getattr(logprobs, "content", None) or [None])[0]
        if not isinstance(entry, dict) or entry.get("id") != token or entry.get("logprob") is None:
            raise CaictlError(
                f"server at {url} gave no log-prob of token {token} for model {self.model!r} (a one-token completion "
                "forced by logit_bias); scoring with token ids needs /v1/completions with `echo` and `logprobs` "
                "(vLLM) or `logprobs` and `logit_bias` (llama.cpp's llama-server)")
        return float(entry["logprob"])

    def _has_template(self) -> bool:
        return self.encoder is not None and bool(getattr(self.encoder.tokenizer, "chat_template", None))

    # Text -----------------------------------------------------------------------------------------------

    def _text_choice_logprobs(self, texts: list[str], choices: list[str]) -> ChoiceScores:
        """From the server's echoed prompt log-probs (/v1/completions with echo) on the defused text: one request
        per (text, choice)."""

        def one(pair, key):
            text, choice = defuse(pair[0]), defuse(pair[1])
            self._sent_as_text()
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

    def _sent_as_text(self) -> None:
        with self._lock:
            self.text_prompt_requests += 1

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

    def _call(self, request, only: Server | None = None):
        """request(client) on the server with the fewest requests in flight, failing over to the others; returns
        (the response, the URL of the server that gave it). Retries count rounds: in each, every server is tried
        once, those in rotation first, so with one server a round is one attempt; the run stops when every server
        has failed the request max_retries + 1 times. only: ask that server and no other (the checks of each)."""
        import openai

        tried, error = set(), None
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.retries += 1
                time.sleep(self._wait(attempt - 1, error))
                tried.clear()
            while server := self._pick(tried, only):
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
        raise self._gave_up(error, [only] if only else self.servers)

    def _pick(self, tried: set, only: Server | None = None) -> Server | None:
        """The server not yet tried in this round: of those in rotation, the one with the fewest requests in flight
        (then the fewest sent, so that one request at a time still alternates); with none in rotation, the one back
        soonest. None when the round is over."""
        with self._lock:
            now = time.monotonic()
            untried = [s for s in ([only] if only else self.servers) if s not in tried]
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

    def _gave_up(self, error, servers: list[Server]) -> CaictlError:
        advice = "raise --max-retries (or --timeout, for a slow one)"
        if len(servers) == 1:
            return CaictlError(f"{servers[0].url}: gave up after {self.max_retries + 1} attempts "
                               f"({_describe(error)}); check the server, or {advice}")
        every = ", ".join(f"{s.url} ({s.last}; {s.failed} of {s.sent} requests failed)" for s in servers)
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


def _content_encoder(name: str):
    """The ContentEncoder the hf engine would make for the model `name` (the same tokenizer settings and stop ids),
    and the vocabulary sizes its server may report (the tokenizer's, or the model's embedding rows, often padded);
    from local files only."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from caictl.data.control_text import ContentEncoder
    from caictl.ui import quiet_transformers

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load tokenizer {name!r} ({str(error).splitlines()[0]}); pass --tokenizer a local "
                         "folder or a hub id that is cached here")
    tokenizer.model_max_length = 10**9  # long prompts are the server's to refuse, not a warning's
    # The stop ids come from generation_config.json, else from config.json (as a loaded model's would), else from
    # the tokenizer's eos alone (a folder holding only a tokenizer).
    config = generation = None
    with contextlib.suppress(OSError, ValueError):
        config = AutoConfig.from_pretrained(name, local_files_only=True)
    try:
        generation = GenerationConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        generation = GenerationConfig.from_model_config(config) if config is not None else None
    stops = stop_ids(tokenizer, generation)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # as the hf engine does: it joins the special tokens
    return ContentEncoder(tokenizer, stops), {len(tokenizer), getattr(config, "vocab_size", None)} - {None}


def _cached_tokenizer(model: str) -> str | None:
    """`model` where a tokenizer can load from it without a network request: a local folder, or a hub id with
    tokenizer files in the local cache."""
    if Path(model).expanduser().is_dir():
        return model
    from caictl.models.hub import is_hub_id

    if not is_hub_id(model):
        return None
    from huggingface_hub import try_to_load_from_cache

    files = ("tokenizer.json", "tokenizer_config.json")
    return model if any(isinstance(try_to_load_from_cache(model, name), str) for name in files) else None


def _optional(request):
    """request, answering None where the server says it has no such endpoint or cannot take the request (a 4xx
    other than for the key or the rate, a 501): an optional check that the server may not have."""
    import openai

    def optional(client):
        try:
            return request(client)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.RateLimitError):
            raise
        except openai.APIStatusError as error:
            if 400 <= error.status_code < 500 or error.status_code == 501:
                return None
            raise

    return optional


def _said(error) -> str:
    """What a refusal says: the message in its body (the client's own message repeats the status first)."""
    body = getattr(error, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return f"{getattr(error, 'message', '')} {body or ''}"


def _first_line(text: str, width: int = 100) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[:width - 3] + "..."


def _shown(ids: list[int]) -> str:
    return f"{len(ids)} ids {ids[:8]}" + ("..." if len(ids) > 8 else "")
