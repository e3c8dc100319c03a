"""A scripted engine for stage tests: the test decides P(A) and every generation; every call is recorded.

It keeps the engine contract (caictl.engines.base.Engine) and goes to a stage through `run(config, engine=...)`.
A judge's question is read back into (principle, response in slot A, response in slot B), so a test can say
"this judge prefers slot A", "under this principle this response wins" or "this one is far outside the clamp"
and check where each number lands. Its chat template is visible markup, so tests can count turns.
"""

from __future__ import annotations

import math
import re

from caictl.engines.base import ChoiceScores, Generation, SamplingParams

# The judge's question body ends "...{principle}\nOptions:\n(A) {a}\n(B) {b}", then the turn closes.
_OPTIONS = re.compile(r"([^\n]*)\nOptions:\n\(A\) (.*?)\n\(B\) (.*?)(?:</user>|\n\nAssistant:)", re.DOTALL)


class ScriptedEngine:
    name = "scripted"

    def __init__(self, p_a=None, reply=None, chat: bool = True, model: str = "scripted"):
        """p_a(principle, a, b) -> P(A) for a question; reply(prompt, key) -> the text of a generation."""
        self.p_a = p_a or (lambda principle, a, b: 0.5)
        self.reply = reply or (lambda prompt, key: f"scripted reply to {key}")
        self.chat = chat
        self.model = model
        self.calls: list[tuple] = []  # (method, requests, keys or choices), in call order

    def supports_chat(self) -> bool:
        return self.chat

    def chat_prompt(self, chat: list[dict]) -> str | None:
        if not self.chat:
            return None
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in chat) + "<assistant>"

    def generate(self, chats: list[list[dict]], params: SamplingParams, keys: list[str]) -> list[Generation]:
        self.calls.append(("generate", chats, keys))
        return [self._generation(self.chat_prompt(chat), key) for chat, key in zip(chats, keys)]

    def complete(self, texts: list[str], params: SamplingParams, keys: list[str]) -> list[Generation]:
        self.calls.append(("complete", texts, keys))
        return [self._generation(text, key) for text, key in zip(texts, keys)]

    def choice_logprobs(self, texts: list[str], choices: list[str]) -> ChoiceScores:
        self.calls.append(("choice_logprobs", texts, choices))
        scores = []
        for text in texts:
            principle, a, b = question_parts(text)
            p = min(max(self.p_a(principle, a, b), 1e-12), 1 - 1e-12)
            scores.append([math.log(p), math.log(1 - p)])
        return ChoiceScores.uncut(scores)

    def _generation(self, prompt: str, key: str) -> Generation:
        text = self.reply(prompt, key)
        return Generation(text, len(prompt.split()), len(text.split()), "stop")


def question_parts(text: str) -> tuple[str, str, str]:
    """(principle, response in slot A, response in slot B) of the last question in a judge's text."""
    matches = list(_OPTIONS.finditer(text))
    if not matches:
        raise AssertionError(f"not a judge question: {text[-200:]!r}")
    principle, a, b = matches[-1].groups()
    return principle, a, b
