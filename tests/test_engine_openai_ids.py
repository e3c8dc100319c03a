"""Token-exact prompts from the openai engine: with the model's tokenizer it renders every request itself, as the hf
engine does, and sends token ids. Against llama.cpp's own llama-server (which takes token ids) on the tiny model and
the qwen2.5 family model, written without any logit bias so that its log-probs are the Hugging Face model's; against
llama-cpp-python's server (which takes text only); and against a stub of vLLM's API (tokenize endpoint, echoed
prompt log-probs) for what no local server does."""

from __future__ import annotations

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import llama_server
import pytest

from caictl.data import control_text as tokens
from caictl.engines import SamplingParams, load_engine
from caictl.errors import UsageError
from caictl.feedback.judge import ANSWER_CUE, CHOICES
from caictl.models.identity import identity

tiny_gguf = llama_server.tiny_gguf
llama_server_url = llama_server.llama_server_url
exact_tiny_gguf = llama_server.exact_tiny_gguf
exact_qwen_gguf = llama_server.exact_qwen_gguf
tiny_llama_cpp = llama_server.tiny_llama_cpp
qwen_llama_cpp = llama_server.qwen_llama_cpp

CORPUS = json.loads((Path(__file__).parent / "data" / "control_text_corpus.json").read_text(encoding="utf-8"))
GREEDY_TOKEN = SamplingParams(max_new_tokens=1, temperature=0.0)


def corpus_chats() -> list[list[dict]]:
    """Each corpus string inside user content, in the system prompt, and split across two messages."""
    chats = []
    for entry in CORPUS:
        text, half = entry["text"], len(entry["text"]) // 2
        chats += [
            [{"role": "user", "content": f"Say this back: {text}"}],
            [{"role": "system", "content": f"Be brief. {text}"}, {"role": "user", "content": "Hi"}],
            [{"role": "user", "content": f"Tell me: {text[:half]}"},
             {"role": "assistant", "content": f"{text[half:]} is it."}, {"role": "user", "content": "Go on."}],
        ]
    return chats


def corpus_questions() -> list[list[dict]]:
    """A label-style question about each corpus string."""
    return [[{"role": "user", "content": f"Consider: {e['text']}\nWhich is kinder?\nOptions:\n(A) {e['text']}\n"
                                         "(B) Hello."}] for e in CORPUS]


def recording(engine) -> list[dict]:
    """Every /v1/completions request the engine sends from now on, as it goes to the server."""
    sent = []
    for server in engine.servers:
        resource = server.client.completions

        def create(create=resource.create, **request):
            sent.append(request)
            return create(**request)

        resource.create = create
    return sent


def control_count(hf, ids: list[int]) -> int:
    control = {hf.tokenizer.convert_tokens_to_ids(t) for t in hf.encoder.control}
    return sum(i in control for i in ids)


def detokenized(url: str, ids: list[int]) -> str:
    request = urllib.request.Request(url.removesuffix("/v1") + "/detokenize", data=json.dumps({"tokens": ids}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["content"]


@pytest.fixture(scope="module", params=["tiny", "qwen2.5"])
def served(request):
    """(llama-server, the model folder it serves, an hf engine on that folder)."""
    server, gguf = {"tiny": ("tiny_llama_cpp", "exact_tiny_gguf"),
                    "qwen2.5": ("qwen_llama_cpp", "exact_qwen_gguf")}[request.param]
    folder = request.getfixturevalue(gguf)[0]
    return request.getfixturevalue(server), folder, load_engine("hf", str(folder), batch_size=8)


# llama.cpp's llama-server ---------------------------------------------------------------------------------------


def test_the_ids_sent_are_the_hf_engines_and_the_server_reads_them_as_those(served):
    server, folder, hf = served
    engine = load_engine("openai", "m", base_url=server.url, tokenizer=str(folder), concurrency=1)
    assert engine.prompt_form == "ids" and engine.prompt_meta() == {"prompt_form": "ids",
                                                                    "tokenizer": identity(str(folder))}
    chats = corpus_chats()
    sent = recording(engine)
    generations = engine.generate(chats, GREEDY_TOKEN, [str(i) for i in range(len(chats))])
    expected = hf.encoder.encode([hf.chat_prompt(chat) for chat in chats])
    assert [request["prompt"] for request in sent] == expected and engine.text_prompt_requests == 0
    # The server read each prompt as those ids: as many, and they spell the rendered chat.
    assert [g.prompt_tokens for g in generations] == [len(ids) for ids in expected]
    for chat, ids in zip(chats, expected):
        assert engine.chat_prompt(chat) == hf.chat_prompt(chat)
        assert detokenized(server.url, ids) == tokens.unmark(hf.chat_prompt(chat))
        # No control id from content: as many as the template writes around plain content.
        plain = hf.encoder.encode([hf.chat_prompt([{**message, "content": "x"} for message in chat])])[0]
        assert control_count(hf, ids) == control_count(hf, plain), chat
    # The same holds for completions of marked text (a transcript with control text in it).
    transcripts = [tokens.mark(f"\n\nHuman: {e['text']}\n\nAssistant:") for e in CORPUS]
    sent.clear()
    generations = engine.complete(transcripts, GREEDY_TOKEN, [str(i) for i in range(len(transcripts))])
    expected = hf.encoder.encode(transcripts)
    assert [request["prompt"] for request in sent] == expected
    assert [g.prompt_tokens for g in generations] == [len(ids) for ids in expected]


def test_chat_replies_end_where_the_server_ends_the_turn(served):
    server, folder, hf = served
    engine = load_engine("openai", "m", base_url=server.url, tokenizer=str(folder))
    # With the end of turn forced, the reply is empty and ends there, as the hf engine's would.
    end = hf.stop_ids[0]
    sent = recording(engine)
    client = engine.servers[0].client.completions
    original = client.create
    client.create = lambda **request: original(**request, logit_bias={str(end): 100})
    (reply,) = engine.generate(corpus_chats()[:1], SamplingParams(max_new_tokens=8, temperature=0.0), ["k"])
    assert (reply.text, reply.finish_reason, reply.completion_tokens) == ("", "stop", 1) and len(sent) == 1


def test_label_choice_logprobs_equal_the_hf_engines(served):
    server, folder, hf = served
    engine = load_engine("openai", "m", base_url=server.url, tokenizer=str(folder))
    texts = [engine.chat_prompt(question) + ANSWER_CUE for question in corpus_questions()]
    assert texts == [hf.chat_prompt(question) + ANSWER_CUE for question in corpus_questions()]
    for choices in ([" (A)", " (B)"], list(CHOICES)):
        got = engine.choice_logprobs(texts, choices).logprobs
        want = hf.choice_logprobs(texts, choices).logprobs
        assert engine._scoring == "forced"  # llama-server gives no prompt log-probs
        for (a, b), (hf_a, hf_b) in zip(got, want, strict=True):
            assert a != b and a - b == pytest.approx(hf_a - hf_b, abs=1e-4)
            # The GGUF carries no bias: the log-probs themselves are the hf engine's.
            assert (a, b) == pytest.approx((hf_a, hf_b), abs=1e-3)
    assert engine.text_prompt_requests == 0


def test_a_tokenizer_that_is_not_the_servers_is_refused_naming_both(qwen_llama_cpp, tiny_model):
    with pytest.raises(UsageError) as refused:
        load_engine("openai", "qwen", base_url=qwen_llama_cpp.url, tokenizer=str(tiny_model))
    message = str(refused.value)
    assert f"tokenizer {str(tiny_model)!r} does not match the server at {qwen_llama_cpp.url} (model 'qwen')" in message


# llama-cpp-python's server: text only ---------------------------------------------------------------------------


def test_a_server_that_refuses_token_ids_gets_text_at_once_and_is_told_once(llama_server_url, tiny_gguf, capsys):
    access_log = tiny_gguf[1].with_suffix(".server.log")
    before = len(access_log.read_text(errors="replace"))
    capsys.readouterr()
    engine = load_engine("openai", "tiny", base_url=llama_server_url, tokenizer=str(tiny_gguf[0]))
    answered = access_log.read_text(errors="replace")[before:]
    # One token-id request (refused with a 500), no retry: before it, the tokenize endpoint (absent) and the models.
    assert answered.count('"POST /v1/completions') == 1 and '"POST /v1/completions HTTP/1.1" 500' in answered
    assert engine.retries == 0 and [(s.sent, s.failed) for s in engine.servers] == [(3, 0)]
    assert engine.prompt_form == "text-defused" and engine.chat_prompt(corpus_chats()[0]) is None
    meta = engine.prompt_meta()
    assert meta["tokenizer"] == identity(str(tiny_gguf[0])) and meta["prompt_form_fallback"].startswith(
        f"{llama_server_url} refused a token-id prompt (HTTP 500: ")
    params = SamplingParams(max_new_tokens=8, seed=3)
    chats = engine.generate(corpus_chats()[:2], params, ["a", "b"])
    texts = engine.complete(["\n\nHuman: <|im_end|> hello\n\nAssistant:"], params, ["c"])
    assert all(g.text and g.completion_tokens for g in chats + texts) and engine.text_prompt_requests == 3
    assert capsys.readouterr().err.count("refused a token-id prompt") == 1


# A stub of vLLM's API: what the local servers do not do ----------------------------------------------------------


class StubServer:
    """vLLM's endpoints as the engine uses them, over a Hugging Face folder: /tokenize (vLLM's request form),
    /v1/models and /v1/completions with token-id prompts, answering one token and, with `echo`, the prompt's
    log-probs from `lm` (a transformers model). tokenize=False: no tokenize endpoint; n_vocab: the vocabulary size
    /v1/models reports (llama-server's `meta`). Records every completions request."""

    def __init__(self, folder, lm=None, tokenize: bool = True, n_vocab: int | None = None):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        self.completions: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                meta = {"meta": {"n_vocab": n_vocab}} if n_vocab else {}
                self._send(200, {"object": "list", "data": [{"id": "stub", "object": "model", **meta}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize" and tokenize:
                    ids = tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True)).input_ids
                    self._send(200, {"tokens": ids, "count": len(ids)})
                elif self.path == "/v1/completions":
                    owner.completions.append(body)
                    self._send(200, owner.completion(body, lm, tokenizer))
                else:
                    self._send(404, {"error": {"message": "Not Found"}})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def completion(body: dict, lm, tokenizer) -> dict:
        ids = body["prompt"]
        logprobs = None
        if body.get("echo") and lm is not None:
            import torch

            with torch.no_grad():
                scores = torch.log_softmax(lm(torch.tensor([ids])).logits[0].float(), -1)
            logprobs = {"tokens": [tokenizer.decode([i]) for i in ids] + ["x"],
                        "text_offset": list(range(len(ids) + 1)), "top_logprobs": None,
                        "token_logprobs": [None] + [scores[k - 1, ids[k]].item() for k in range(1, len(ids))] + [-1.0]}
        return {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "text": "x", "finish_reason": "length", "logprobs": logprobs}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def make(*args, **options):
        servers.append(StubServer(*args, **options))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_echoed_prompt_logprobs_are_read_where_the_server_gives_them(stub, tiny_model):
    hf = load_engine("hf", str(tiny_model))
    server = stub(tiny_model, lm=hf.lm)
    engine = load_engine("openai", "stub", base_url=server.url, tokenizer=str(tiny_model))
    texts = [engine.chat_prompt(question) + ANSWER_CUE for question in corpus_questions()[:6]]
    before = len(server.completions)
    got = engine.choice_logprobs(texts, [" (A)", " (B)"]).logprobs
    assert engine._scoring == "echo" and len(server.completions) - before == 2 * len(texts)  # one per pair
    want = hf.choice_logprobs(texts, [" (A)", " (B)"]).logprobs
    assert [a for pair in got for a in pair] == pytest.approx([a for pair in want for a in pair], abs=1e-5)


@pytest.mark.parametrize("family", ["llama3", "phi3"])
def test_the_ids_sent_are_the_hf_engines_in_every_family(stub, family_model, family):
    folder = family_model(family)
    server = stub(folder)
    engine = load_engine("openai", str(folder), base_url=server.url, concurrency=1)  # the tokenizer: the folder
    assert engine.prompt_form == "ids" and engine.prompt_meta()["tokenizer"] == identity(str(folder))
    hf = load_engine("hf", str(folder), weights=False)
    chats = corpus_chats()
    before = len(server.completions)
    engine.generate(chats, GREEDY_TOKEN, [str(i) for i in range(len(chats))])
    expected = hf.encoder.encode([hf.chat_prompt(chat) for chat in chats])
    assert [body["prompt"] for body in server.completions[before:]] == expected
    for chat, ids in zip(chats, expected):
        plain = hf.encoder.encode([hf.chat_prompt([{**message, "content": "x"} for message in chat])])[0]
        assert control_count(hf, ids) == control_count(hf, plain), chat
    texts = [engine.chat_prompt(question) + ANSWER_CUE for question in corpus_questions()]
    assert texts == [hf.chat_prompt(question) + ANSWER_CUE for question in corpus_questions()]


def test_a_vocabulary_size_that_is_not_the_tokenizers_is_refused(stub, tiny_model):
    server = stub(tiny_model, tokenize=False, n_vocab=32000)
    with pytest.raises(UsageError, match=rf"tokenizer {str(tiny_model)!r} does not match the server at "
                                         rf"{server.url} \(model 'stub'\): 1024 tokens, the server's vocabulary 32000"):
        load_engine("openai", "stub", base_url=server.url, tokenizer=str(tiny_model))
    assert load_engine("openai", "stub", base_url=stub(tiny_model, tokenize=False, n_vocab=1024).url,
                       tokenizer=str(tiny_model)).prompt_form == "ids"


def test_without_a_tokenizer_prompts_go_as_defused_text_and_the_engine_says_so_once(stub, tiny_model, capsys):
    server = stub(tiny_model)
    capsys.readouterr()
    engine = load_engine("openai", "not-a-cached-model", base_url=server.url, concurrency=1)
    assert engine.prompt_form == "text-defused" and engine.prompt_meta() == {"prompt_form": "text-defused",
                                                                             "tokenizer": None}
    assert not server.completions  # nothing is asked of the server before the first request
    engine.complete(["a <|im_end|> b", "c"], GREEDY_TOKEN, ["a", "b"])
    assert engine.text_prompt_requests == 2
    assert [body["prompt"] for body in server.completions] == [f"a <{tokens.WORD_JOINER}|im_end|> b", "c"]
    assert capsys.readouterr().err.count("no tokenizer for 'not-a-cached-model'") == 1
