"""What the stages that generate text (revise, sample) share: opening an engine and shaping a request."""

from __future__ import annotations

from dataclasses import dataclass, replace

from caictl import settings
from caictl.data.conversation import render_transcript
from caictl.engines import ENGINES, Engine, Generation, SamplingParams, load_engine
from caictl.errors import UsageError
from caictl.ui import log

PROMPT_STYLES = ("auto", "chat", "transcript")


def sampling_problems(config) -> list[str]:
    """What is wrong with the options that sample and prompts generate share: the engine, sampling, batching and
    prompt style, each problem said with its flag."""
    problems = []
    if config.engine not in ENGINES:
        problems.append(f"--engine {config.engine!r}: choose one of {', '.join(ENGINES)}")
    if config.temperature < 0 or not 0 < config.top_p <= 1:
        problems.append("--temperature must be >= 0 and --top-p in (0, 1]")
    if config.max_new_tokens < 1 or config.batch_size < 1 or config.concurrency < 1:
        problems.append("--max-new-tokens, --batch-size and --concurrency must be at least 1")
    if config.prompt_style not in PROMPT_STYLES:
        problems.append(f"--prompt-style {config.prompt_style!r}: choose one of {', '.join(PROMPT_STYLES)}")
    return problems


def open_engine(config, model: str) -> Engine:
    """The engine `config.engine` for `model`, with the stage config's engine options. The servers (one URL or
    several), a server's retries, time-out and tokenizer come from the flag, else CAICTL_BASE_URL /
    CAICTL_MAX_RETRIES / CAICTL_TIMEOUT / CAICTL_TOKENIZER or caictl.yaml, else the openai engine's own defaults."""
    if config.engine == "openai":
        options = {"base_url": settings.base_urls(config.base_url), "concurrency": config.concurrency}
        retries = settings.resolve("max_retries", config.max_retries)
        seconds = settings.resolve("timeout", config.timeout)
        tokenizer = settings.resolve("tokenizer", getattr(config, "tokenizer", None))
        if retries is not None:
            options["max_retries"] = _number(retries, int, "max_retries", minimum=0)
        if seconds is not None:
            options["timeout"] = _number(seconds, float, "timeout", minimum=1e-3)
        if tokenizer is not None:
            options["tokenizer"] = str(tokenizer)
        return load_engine(config.engine, model, **options)
    return load_engine(config.engine, model, batch_size=config.batch_size, compile=config.compile)


def prompt_meta(engine) -> dict:
    """How the engine's prompts reach the model, for every row's meta and a resume's check (RecordWriter.settle):
    nothing for the hf engine (content is always read as text there); the openai engine's prompt form ("ids" or
    "text-defused") and tokenizer."""
    return engine.prompt_meta() if hasattr(engine, "prompt_meta") else {}


def engine_summary(engine) -> dict:
    """The openai engine's prompt form and how many requests went as text, for a stage's summary."""
    if engine is None or not hasattr(engine, "prompt_meta"):
        return {}
    return {"prompt_form": engine.prompt_form, "text_prompt_requests": engine.text_prompt_requests}


def _number(value, kind, name: str, minimum: float):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        raise UsageError(f"--{name.replace('_', '-')} {value!r}: expected a {kind.__name__} >= {minimum:g} "
                         f"(the flag, CAICTL_{name.upper()} or `{name}:` in caictl.yaml)")
    return number


def log_servers(engine) -> None:
    """One line on how the requests were spread, when the engine had several servers (the openai engine)."""
    servers = getattr(engine, "servers", [])
    if len(servers) > 1:
        log("requests per server: " + ", ".join(f"{s.url} {s.sent} ({s.failed} failed)" for s in servers))


def prompt_style(requested: str, engine: Engine) -> str:
    """chat when the model has a chat template (auto), else Anthropic-style transcripts for base models."""
    if requested == "auto":
        return "chat" if engine.supports_chat() else "transcript"
    return requested


def response_request(style: str, messages: list[dict]):
    """The request for an assistant reply to a conversation: messages (chat) or an open transcript."""
    return messages if style == "chat" else render_transcript(messages, open_assistant_turn=True)


def respond(engine: Engine, style: str, requests: list, params: SamplingParams, keys: list[str]) -> list[Generation]:
    """Replies to requests made by response_request. Stop strings apply to transcripts only: a chat reply
    ends at the model's own end of turn."""
    if style == "chat":
        return engine.generate(requests, replace(params, stop=()), keys)
    return engine.complete(requests, params, keys)


# A base model that has finished its reply goes on to write the next human turn.
STOP_RESPONSE = ("\n\nHuman:",)


@dataclass
class Cuts:
    """Texts cut from the front to fit (a model's context, or a preference model's --max-length), counted so that
    no cut is silent: in the row (meta.truncated_tokens, or the field `key`), in the stage's summary, and in one
    warning."""

    what: str = "prompt(s) did not fit the model's context"
    key: str = "meta.truncated_tokens"
    rows: int = 0
    tokens: int = 0

    def count(self, truncated_tokens: int) -> int:
        """Counts one row that lost `truncated_tokens` tokens (none when 0); returns the number back."""
        if truncated_tokens:
            self.rows += 1
            self.tokens += truncated_tokens
        return truncated_tokens

    def meta(self, meta: dict, truncated_tokens: int) -> dict:
        """A row's meta, with `truncated_tokens` when its prompt was cut; the row is counted."""
        if not self.count(truncated_tokens):
            return meta
        return {**meta, "truncated_tokens": truncated_tokens}

    def summary(self) -> dict:
        return {"truncated_rows": self.rows, "truncated_tokens": self.tokens}

    def warn(self) -> None:
        if self.rows:
            log(f"warning: {self.rows} {self.what} and were cut from the front ({self.tokens:,} tokens in all); "
                f"each such row says how many in {self.key}")
