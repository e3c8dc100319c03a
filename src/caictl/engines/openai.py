"""Any OpenAI-compatible server: vLLM serve, TGI, llama.cpp, Ollama, hosted APIs.

    caictl revise prompts.jsonl --engine openai --base-url http://127.0.0.1:8000/v1 --model my-model

Every text caictl sends is content: a piece of it shaped like a control token (`<|im_end|>`, `</s>`) is broken
with an invisible word joiner (caictl.tokens.defuse), because servers parse control tokens in any text they get.
Requests run concurrently under a limit; 429s, 5xx answers, time-outs and dropped connections are retried
with exponential backoff (honouring Retry-After). The key comes from OPENAI_API_KEY and is never logged or
written anywhere.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

from caictl.engines.base import Generation, SamplingParams, cut_at_stop, request_seed
from caictl.errors import CaictlError, UsageError
from caictl.tokens import defuse

# The OpenAI API takes at most four stop strings; the rest are applied to the text afterwards.
MAX_SERVER_STOPS = 4


class OpenAIEngine:
    name = "openai"

    def __init__(self, model: str, base_url: str | None = None, concurrency: int = 8, max_retries: int = 6,
                 timeout: float = 120.0, backoff: float = 1.0, batch_size: int | None = None):
        import openai

        if not base_url:
            raise UsageError("--engine openai needs --base-url (or CAICTL_BASE_URL), e.g. http://127.0.0.1:8000/v1")
        self.model = model
        self.base_url = base_url
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff = backoff
        # Retries are ours (below), so that what is retried and how long we wait is explicit and logged.
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY") or "none",
                                    max_retries=0, timeout=timeout)
        self.retries = 0  # requests retried so far, for the summary

    def supports_chat(self) -> bool:
        return True

    def generate(self, chats: list[list[dict]], params: SamplingParams, keys: list[str]) -> list[Generation]:
        def one(chat, key):
            # Content is text: the server's template renders it and its tokenizer would read control tokens in it.
            chat = [{k: defuse(v) if isinstance(v, str) else v for k, v in m.items()} for m in chat]
            response = self._call(self.client.chat.completions.create, messages=chat,
                                  **self._sampling(params, key))
            choice = response.choices[0]
            return self._result(choice.message.content or "", choice.finish_reason, response.usage, params)

        return self._map(one, chats, keys)

    def complete(self, texts: list[str], params: SamplingParams, keys: list[str]) -> list[Generation]:
        def one(text, key):
            response = self._call(self.client.completions.create, prompt=defuse(text),
                                  **self._sampling(params, key))
            choice = response.choices[0]
            return self._result(choice.text or "", choice.finish_reason, response.usage, params)

        return self._map(one, texts, keys)

    def chat_prompt(self, chat: list[dict]) -> None:
        return None  # the server applies its own template; scoring goes through /v1/completions text

    def choice_logprobs(self, texts: list[str], choices: list[str]) -> list[list[float]]:
        """Log-prob of each choice as the continuation of each text, from the server's echoed prompt
        log-probs (/v1/completions with echo): one scoring request per (text, choice), nothing sampled."""

        def one(pair, key):
            text, choice = defuse(pair[0]), defuse(pair[1])
            response = self._call(self.client.completions.create, model=self.model, prompt=text + choice,
                                  max_tokens=1, temperature=0.0, logprobs=1, echo=True)
            logprobs = response.choices[0].logprobs
            if not logprobs or not logprobs.token_logprobs or not logprobs.text_offset:
                raise CaictlError(
                    f"server at {self.base_url} returned no prompt log-probs for model {self.model!r}; scoring "
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
        return [flat[i:i + len(choices)] for i in range(0, len(flat), len(choices))]

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

    def _call(self, method, **kwargs):
        import openai

        for attempt in range(self.max_retries + 1):
            try:
                return method(**kwargs)
            except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                    openai.APIConnectionError) as error:
                if attempt == self.max_retries:
                    raise CaictlError(
                        f"{self.base_url}: gave up after {self.max_retries + 1} attempts ({_describe(error)}); "
                        "check the server, or raise --max-retries (or --timeout, for a slow one)"
                    )
                self.retries += 1
                time.sleep(self._wait(attempt, error))
            except openai.AuthenticationError:
                raise UsageError(f"{self.base_url}: authentication failed; set OPENAI_API_KEY to a valid key")
            except openai.NotFoundError as error:
                raise UsageError(f"{self.base_url}: not found ({_describe(error)}); check --model and --base-url")
            except openai.APIStatusError as error:
                raise CaictlError(f"{self.base_url}: request refused ({_describe(error)})")

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
