"""The engine contract: the only place text is generated or scored.

Each request carries a `key` (the row id and step, say). Sampling is seeded by (seed, key), not by the order
of the batch, so the same row gets the same text whatever it was batched with, and a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # generation ends at the first of these; the stop string is not returned
    seed: int = 0


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_new_tokens reached)
    truncated_tokens: int = 0  # prompt tokens cut from the front to fit the model's context (hf engine)


@dataclass(frozen=True)
class ChoiceScores:
    """What choice_logprobs returns, per text in call order."""

    logprobs: list[list[float]]  # the log-probability of each choice as the text's continuation
    # Tokens cut from the text's front to fit the model's context (hf engine); 0 where nothing was cut, and always
    # for a server, which refuses a too-long text instead.
    cuts: list[int]

    @classmethod
    def uncut(cls, logprobs: list[list[float]]) -> ChoiceScores:
        return cls(logprobs, [0] * len(logprobs))


class Engine(Protocol):
    name: str
    model: str

    def supports_chat(self) -> bool:
        """Whether generate() can take chat messages (the model has a chat template)."""

    def generate(self, chats: list[list[dict]], params: SamplingParams, keys: list[str]) -> list[Generation]:
        """One assistant reply to each conversation."""

    def complete(self, texts: list[str], params: SamplingParams, keys: list[str]) -> list[Generation]:
        """A plain continuation of each text (base models, Anthropic-style transcripts)."""

    def chat_prompt(self, chat: list[dict]) -> str | None:
        """The prompt text the model sees for a chat (its template), or None where it is not known here."""

    def choice_logprobs(self, texts: list[str], choices: list[str]) -> ChoiceScores:
        """For each text, the log-probability of each choice as its continuation (no generation), and how many
        tokens were cut from the text's front to fit the model's context."""


def stop_ids(tokenizer, generation_config) -> list[int]:
    """Every id a reply ends at, for every generation in caictl (the engine, PPO's rollouts, eval iterations):
    the tokenizer's eos and each of the model's generation_config ids (Llama 3 stops on three)."""
    listed = getattr(generation_config, "eos_token_id", None)
    listed = listed if isinstance(listed, (list, tuple)) else [listed]
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *listed] if i is not None))


# What every sampled generation passes to transformers' generate() besides its temperature: transformers' own
# defaults are not all off (top_k 50).
NO_SAMPLING_FILTERS = {"top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}


@contextlib.contextmanager
def only_stop_ids(lm):
    """While a generate() call runs, the model's generation_config holds its special-token ids and nothing else.

    transformers fills every field a call leaves unset from the model's generation_config, so a real model's
    sampling settings (Qwen2.5-Instruct ships repetition_penalty 1.05, top_k 20, top_p 0.8, temperature 0.7)
    would reshape the distribution caictl samples from and records, greedy decoding included. Some fields cannot
    be switched off by the call at all, as their off value is the unset one (suppress_tokens, forced_eos_token_id,
    sequence_bias). lm: a transformers model, or a peft model around one."""
    from transformers import GenerationConfig

    model = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    own = model.generation_config
    ids = {name: getattr(own, name, None)
           for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")}
    model.generation_config = GenerationConfig(**{name: i for name, i in ids.items() if i is not None})
    try:
        yield
    finally:
        model.generation_config = own


def request_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one request, stable across runs and batchings."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Text up to the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
