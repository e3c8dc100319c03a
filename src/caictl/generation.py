"""What the stages that generate text (revise, sample) share: opening an engine and shaping a request."""

from __future__ import annotations

from caictl import settings
from caictl.conversation import render_transcript
from caictl.engines import Engine, load_engine

PROMPT_STYLES = ("auto", "chat", "transcript")


def open_engine(name: str, model: str, base_url: str | None, batch_size: int, concurrency: int) -> Engine:
    if name == "openai":
        return load_engine(name, model, base_url=settings.resolve("base_url", base_url), concurrency=concurrency)
    return load_engine(name, model, batch_size=batch_size)


def prompt_style(requested: str, engine: Engine) -> str:
    """chat when the model has a chat template (auto), else Anthropic-style transcripts for base models."""
    if requested == "auto":
        return "chat" if engine.supports_chat() else "transcript"
    return requested


def response_request(style: str, messages: list[dict]):
    """The request for an assistant reply to a conversation: messages (chat) or an open transcript."""
    return messages if style == "chat" else render_transcript(messages, open_assistant_turn=True)


# A base model that has finished its reply goes on to write the next human turn.
STOP_RESPONSE = ("\n\nHuman:",)
