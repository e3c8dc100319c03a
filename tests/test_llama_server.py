"""The llama-cpp-python test server, through the openai client: text, log-prob shapes, echo alignment."""

from __future__ import annotations

import math

import llama_server
import pytest

# Session fixtures from llama_server, made visible to this module.
llama_server_url = llama_server.llama_server_url
tiny_gguf = llama_server.tiny_gguf


@pytest.fixture(scope="module")
def client(llama_server_url):
    from openai import OpenAI

    return OpenAI(base_url=llama_server_url, api_key="none", max_retries=0)


def printable(text: str) -> bool:
    return all(c.isprintable() or c in "\n\t" for c in text)


def test_chat_completion_returns_printable_text(client, tiny_gguf):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be honest."}, {"role": "user", "content": "Is water wet?"}]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=32, seed=1)
    text = response.choices[0].message.content
    assert text and printable(text)
    # The server renders the GGUF's template, which is the model's own minus {% generation %}: same prompt.
    tokenizer = AutoTokenizer.from_pretrained(tiny_gguf[0])
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert response.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False).input_ids)


def test_completions_return_printable_text(client):
    texts = [
        client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=64, seed=seed).choices[0].text
        for seed in range(5)
    ]
    assert all(texts) and all(printable(text) for text in texts), texts


def test_chat_top_logprobs(client):
    response = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True, top_logprobs=5
    )
    # choices[0].logprobs.content: one entry per generated token, {token, logprob, bytes=None, top_logprobs};
    # top_logprobs is a list of {token, logprob, bytes=None}: the top 5 best first, then the sampled token
    # again when it is not among them (so 5 or 6 entries).
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        top = [(t.token, t.logprob) for t in entry.top_logprobs]
        assert 5 <= len(top) <= 6 and (entry.token, entry.logprob) in top
        assert [lp for _, lp in top[:5]] == sorted((lp for _, lp in top[:5]), reverse=True)


def test_completion_top_logprobs(client):
    response = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, logprobs=5)
    logprobs = response.choices[0].logprobs
    # tokens, token_logprobs, text_offset, top_logprobs: parallel lists, one item per generated token.
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == response.choices[0].text
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert 5 <= len(top) <= 6 and top[token] == logprob


def test_single_token_answer_logprobs(client):
    response = client.completions.create(model="tiny", prompt="The answer is: (", max_tokens=1, logprobs=20)
    # What an engine reads for a one-token answer (e.g. "A" or "B" after "The answer is: ("):
    #   response.choices[0].logprobs.top_logprobs == [{token_text: logprob, ...}]
    # a list with one dict, for the one generated token. Keys are token texts exactly as they print,
    # leading space included (" A" and "A" are different tokens); values are natural-log probabilities
    # normalised over the whole vocabulary, from the raw logits (temperature does not change them). The
    # dict holds the 20 most likely tokens plus the sampled token when it is not among them (21 entries);
    # tokens that print the same collapse into one key, so it can hold fewer. Its order is best first,
    # the sampled token last. Unprintable tokens never appear: the GGUF puts their logits 45+ lower.
    # With the openai client: choices[0].logprobs.top_logprobs is List[Dict[str, float]], and
    # choices[0].logprobs.tokens / token_logprobs give the sampled token and its log-prob.
    logprobs = response.choices[0].logprobs
    assert len(logprobs.top_logprobs) == 1
    top = logprobs.top_logprobs[0]
    assert isinstance(top, dict) and 20 <= len(top) <= 21
    assert all(isinstance(k, str) and printable(k) and v <= 0 for k, v in top.items())
    assert top[logprobs.tokens[0]] == logprobs.token_logprobs[0]
    assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6


def test_echo_logprobs_line_up_with_prompt_tokens(client, tiny_gguf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "The constitution asks for honest and helpful answers."
    response = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=1, logprobs=1, echo=True, temperature=0
    )
    choice = response.choices[0]
    # echo=True: the lists cover the prompt tokens, then the generated one; the first entries of
    # token_logprobs and top_logprobs are None (nothing to condition on; the BOS the server adds is not listed).
    assert choice.text.startswith(prompt) and "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None

    # The same numbers from the Hugging Face model, given the server's BOS (<|endoftext|>) in front: entry k
    # is log p(token k | BOS, tokens before k), normalised over the printable tokens only, because the GGUF
    # pushes the others ~-100 down. This also checks the q/k permutation of write_gguf.
    model_dir = tiny_gguf[0]
    ids = AutoTokenizer.from_pretrained(model_dir)(prompt, add_special_tokens=False).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ok = torch.tensor(sorted(llama_server.printable_token_ids(model_dir)))
    with torch.no_grad():
        logits = model(torch.tensor([[0, *ids]])).logits[0]
    logprobs = torch.full_like(logits, -math.inf)
    logprobs[:, ok] = logits[:, ok].log_softmax(-1)
    expected = [logprobs[k, token].item() for k, token in enumerate(ids)][1:]
    got = choice.logprobs.token_logprobs[1 : len(ids)]
    assert got == pytest.approx(expected, abs=1e-5)
    # The generated token (greedy) lines up too: the last entry is its log-prob, the best one.
    greedy = choice.logprobs.token_logprobs[-1]
    assert greedy == pytest.approx(logprobs[len(ids)].max().item(), abs=1e-5)
