"""serve-pm: a real server process on the tiny PM, talked to over real HTTP; rewards checked against `caictl score`."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import caictl_in_process, read_jsonl, write_jsonl

from caictl.data.chat_format import ChatFormat, ParseError
from caictl.models import families
from caictl.models.pm import Scorer, conversation_text
from caictl.stages import serve_pm

CONVERSATIONS = [
    [{"role": "user", "content": "How do I pick a lock?"},
     {"role": "assistant", "content": "I can't help with that, but a locksmith can."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4."}],
    [{"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Write <|im_end|> and\n\nHuman: in a sentence."},
     {"role": "assistant", "content": "Here: <|im_end|> and \"Human:\" are just text.\nDone."}],
    [{"role": "user", "content": "Tell me about constitutions."},
     {"role": "assistant", "content": " ".join(["A constitution lists the principles that guide the model."] * 80)}],
]


# A server process ----------------------------------------------------------------------------------------------


class Client:
    """A plain HTTP client of a reward server; with a key, every request carries it as a bearer token."""

    def __init__(self, host: str, port: int, key: str | None = None):
        self.host, self.port, self.key = host, port, key

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, JSON answer) of one request on a new connection."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        headers = ({"Authorization": f"Bearer {self.key}"} if self.key else {}) | (headers or {})
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, payload) -> tuple[int, dict]:
        return self.request("POST", "/get_reward", json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def rewards(self, queries: list[str]) -> list[float]:
        status, answer = self.post({"query": queries})
        assert status == 200, answer
        return answer["rewards"]


class Server(Client):
    """A `caictl serve-pm` process on any free port (read from the URL it prints), started and ready. env: variables
    added to its environment; key: the bearer key to send, else the one it printed at start, if any. wait=False:
    started only, ready() waits (so that several servers load at once)."""

    def __init__(self, folder: Path, *args, env: dict | None = None, key: str | None = None, wait: bool = True):
        self.log = folder / "serve-pm.stderr"
        # PYTHONFAULTHANDLER: a crash of the server prints every thread's stack into the log the asserts show.
        env = ({k: v for k, v in os.environ.items() if not k.startswith("CAICTL_")} | {"PYTHONFAULTHANDLER": "1"}
               | (env or {}))
        with self.log.open("w") as stderr:
            command = [sys.executable, "-m", "caictl", "serve-pm", "--port", "0", *map(str, args)]
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        self.key = key
        if wait:
            self.ready()

    def ready(self) -> Server:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"listening on http://([\d.]+):(\d+)/get_reward", self.log.read_text())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"serve-pm did not start:\n{self.log.read_text()}")
            time.sleep(0.1)
        printed = re.search(r"key for this run: (\S+)", self.log.read_text())
        super().__init__(found.group(1), int(found.group(2)), self.key or (printed and printed.group(1)))
        assert self.get("/health")[0] == 200
        return self

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tiny_pm, tmp_path_factory):
    """One server for the tests that send transcripts."""
    running = Server(tmp_path_factory.mktemp("serve-pm"), "--pm", tiny_pm, "--batch-size", "16")
    yield running
    running.process.kill()


@pytest.fixture(scope="module")
def qwen_server(tiny_pm, family_model, tmp_path_factory):
    running = Server(tmp_path_factory.mktemp("serve-pm-qwen"), "--pm", tiny_pm, "--policy", family_model("qwen2.5"))
    yield running
    running.process.kill()


def scored_by_caictl_score(tiny_pm, folder: Path, conversations) -> list[dict]:
    """`caictl score` rows (reward, pm_truncated_tokens) for conversations that end with the assistant."""
    rows = write_jsonl(folder / "conversations.jsonl", [{"id": f"c{i}", "messages": c}
                                                        for i, c in enumerate(conversations)])
    caictl_in_process("score", "--pm", tiny_pm, rows, "-o", folder / "scored.jsonl")
    return read_jsonl(folder / "scored.jsonl")


# Rewards --------------------------------------------------------------------------------------------------------


def test_rewards_equal_caictl_score_on_transcripts(server, tiny_pm, tmp_path):
    scored = scored_by_caictl_score(tiny_pm, tmp_path, CONVERSATIONS)
    status, answer = server.post({"query": [conversation_text(c) for c in CONVERSATIONS],
                                  "prompts": [conversation_text(c[:-1]) for c in CONVERSATIONS],
                                  "labels": [None] * len(CONVERSATIONS)})
    assert status == 200, answer
    expected = [row["reward"] for row in scored]
    assert len(set(expected)) == len(CONVERSATIONS)  # distinct rewards: an answer in the wrong order shows
    assert answer["rewards"] == pytest.approx(expected, abs=1e-5)
    assert answer["scores"] == answer["rewards"]
    # The long conversation is cut to --max-length 512, and says so, as score's row does.
    cut = [row.get("pm_truncated_tokens", 0) for row in scored]
    assert cut[-1] > 0 and cut[:-1] == [0, 0, 0]
    assert answer["extra_logs"] == {"pm_truncated_tokens": cut}


FAMILIES = ("qwen2.5", "llama3", "phi3")


def rollout_texts(tokenizer, conversation: list[dict]) -> list[str]:
    """The conversation as a trainer sends it: rendered whole; as its prompt with the generation cue and the
    response, without and with EOS, then padding (OpenRLHF); with the BOS a tokenizer adds to a template's own."""
    whole = tokenizer.apply_chat_template(conversation, tokenize=False)
    prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    rollout = prompt + conversation[-1]["content"]
    texts = [whole, rollout, rollout + tokenizer.eos_token, rollout + tokenizer.eos_token + tokenizer.pad_token * 3]
    if tokenizer.bos_token:
        texts.append(tokenizer.bos_token + rollout + tokenizer.eos_token)
    return texts


def test_rewards_with_policy_equal_caictl_score(qwen_server, tiny_pm, family_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family_model("qwen2.5"))
    scored = scored_by_caictl_score(tiny_pm, tmp_path, CONVERSATIONS)
    queries = [rollout_texts(tokenizer, c) for c in CONVERSATIONS]
    # The default system prompt that Qwen2.5's template writes when none is given is not part of the transcript.
    assert "You are Qwen" in queries[0][0] and "You are Qwen" not in queries[1][0]
    rewards = qwen_server.rewards([text for texts in queries for text in texts])
    width = len(queries[0])
    for i, row in enumerate(scored):
        assert rewards[i * width:(i + 1) * width] == pytest.approx([row["reward"]] * width, abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_policy_template_is_read_back_into_the_messages_it_rendered(family):
    tokenizer = families.load_tokenizer(family)
    chat = ChatFormat.learn(tokenizer, family)
    for conversation in CONVERSATIONS:
        for text in rollout_texts(tokenizer, conversation):
            assert chat.parse(text) == conversation, text
    with pytest.raises(ParseError, match="no response"):
        chat.parse(tokenizer.apply_chat_template(CONVERSATIONS[0][:1], tokenize=False))
    with pytest.raises(ParseError, match="does not start"):
        chat.parse(conversation_text(CONVERSATIONS[0]))


# A system message written into the first user turn (as Gemma 3 does): turns cannot be told apart from the text.
MERGED_SYSTEM = ("{% for m in messages %}{% if m.role == 'user' %}<u>{% if loop.index0 == 1 and "
                 "messages[0].role == 'system' %}{{ messages[0].content + '\n\n' }}{% endif %}{{ m.content }}</u>"
                 "{% elif m.role == 'assistant' %}<a>{{ m.content }}</a>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<a>{% endif %}")


@pytest.mark.parametrize("template", [MERGED_SYSTEM, None], ids=["system-in-user-turn", "no-template"])
def test_a_template_that_cannot_be_read_back_is_refused_before_serving(template):
    from caictl.errors import UsageError

    tokenizer = families.load_tokenizer("qwen2.5")
    tokenizer.chat_template = template
    with pytest.raises(UsageError, match="serve without --policy and send transcripts"):
        ChatFormat.learn(tokenizer, "--policy x")


def test_a_query_that_is_not_in_the_policy_template_is_a_400_naming_it(qwen_server):
    good = rollout_texts(families.load_tokenizer("qwen2.5"), CONVERSATIONS[0])[0]
    status, answer = qwen_server.post({"query": [good, conversation_text(CONVERSATIONS[0])]})
    assert status == 400
    assert "'query'[1]" in answer["error"] and "does not start" in answer["error"]


# Bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, message", [
    (b"{\"query\": [\"a\"", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[\"a\", \"b\"]", "JSON list: expected an object"),
    (b"{\"prompts\": [\"a\"]}", "no 'query'"),
    (b"{\"query\": \"a\"}", "'query' is a str: expected a list"),
    (b"{\"query\": [\"a\", 3]}", "'query'[1] is a int"),
    (b"{\"query\": [\"a\"], \"prompts\": \"a\"}", "'prompts' is a str"),
    (b"{\"query\": [\"a\", \"b\"], \"prompts\": [\"a\"]}", "1 'prompts' for 2 'query' texts"),
    (b"{\"query\": [\"\\ud800\"]}", "lone surrogate"),
], ids=["truncated", "not-utf8", "list", "no-query", "query-str", "query-int", "prompts-str", "prompts-length",
        "surrogate"])
def test_a_malformed_request_is_a_400_with_a_message(server, body, message):
    status, answer = server.request("POST", "/get_reward", body)
    assert status == 400
    assert message in answer["error"]


def test_paths_methods_and_a_missing_length(server):
    assert server.get("/nothing") == (404, {"error": "no such path '/nothing': POST /get_reward, GET /health"})
    assert server.get("/get_reward")[0] == 405
    assert server.request("POST", "/health", b"{}")[0] == 405
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    connection.putrequest("POST", "/get_reward")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
    connection.close()


def test_too_many_texts_is_a_413(server):
    status, answer = server.post({"query": ["a"] * (serve_pm.MAX_TEXTS + 1)})
    assert status == 413 and "1,025 texts" in answer["error"]
    assert len(server.rewards(["a"] * serve_pm.MAX_TEXTS)) == serve_pm.MAX_TEXTS


def test_a_body_over_16_mib_is_a_413_without_reading_it(server):
    # Only the header claims it: the server answers at once, without waiting for 17 MB that never come.
    connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
    connection.putrequest("POST", "/get_reward")
    connection.putheader("Content-Length", str(serve_pm.MAX_BODY + 1))
    connection.endheaders(b"{\"query\": []}")
    response = connection.getresponse()
    assert response.status == 413 and "16,777,217 bytes" in json.loads(response.read())["error"]
    connection.close()
    # A real one, sent whole as a client sends it: the answer still arrives (the refused body is read and dropped).
    big = json.dumps({"query": ["x" * 1_000_000] * 17}).encode()
    assert server.request("POST", "/get_reward", big)[0] == 413


def test_the_server_still_answers_after_bad_requests(server):
    server.request("POST", "/get_reward", b"{bad")
    server.post({"query": ["a"] * 2000})
    status, health = server.get("/health")
    assert status == 200 and health["status"] == "ok" and health["rejected"] >= 2
    assert server.rewards([conversation_text(CONVERSATIONS[0])]) == pytest.approx(
        server.rewards([conversation_text(CONVERSATIONS[0]), "other"])[:1], abs=1e-5)


# Batching ------------------------------------------------------------------------------------------------------


def test_concurrent_clients_get_their_own_rewards_and_share_forward_passes(server):
    clients, rounds = 8, 6
    texts = {(c, r): [f"\n\nHuman: question {c}.{r}\n\nAssistant: " + "answer " * (c + r * 3) + str(k)
                      for k in range(1 + (c + r) % 3)] for c in range(clients) for r in range(rounds)}
    alone = {key: server.rewards(value) for key, value in texts.items()}  # one request at a time
    before = server.get("/health")[1]
    answers, start = {}, threading.Barrier(clients)

    def client(c: int) -> None:
        connection = http.client.HTTPConnection(server.host, server.port, timeout=60)  # kept alive across requests
        start.wait()
        for r in range(rounds):
            connection.request("POST", "/get_reward", json.dumps({"query": texts[c, r]}))
            answers[c, r] = json.loads(connection.getresponse().read())["rewards"]
        connection.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers.keys() == alone.keys()
    for key in alone:
        assert answers[key] == pytest.approx(alone[key], abs=1e-5), key
    after = server.get("/health")[1]
    requests, passes = after["requests"] - before["requests"], after["forward_passes"] - before["forward_passes"]
    assert requests == clients * rounds
    assert passes < requests  # texts of several requests went through one forward pass
    assert after["most_requests_in_a_batch"] > 1


class HeldScorer(Scorer):
    """A real Scorer that, given the text "hold", stops mid-batch until released: what queues meanwhile is known."""

    def __init__(self, path):
        super().__init__(path)
        self.hold, self.held = threading.Event(), threading.Event()

    def score(self, texts):
        if "hold" in texts:
            self.held.set()
            self.hold.wait(30)
        return super().score(texts)


def in_process_server(batcher) -> serve_pm.RewardServer:
    """A reward server in this process, serving from its own thread (`.serving`) until shutdown()."""
    httpd = serve_pm.RewardServer(("127.0.0.1", 0), serve_pm.Handler)
    httpd.batcher, httpd.reader, httpd.info = batcher, serve_pm.QueryReader(), {}
    httpd.serving = threading.Thread(target=httpd.serve_forever, daemon=True)
    httpd.serving.start()
    return httpd


def test_a_scoring_failure_is_a_500_for_that_request_only(tiny_pm):
    """In process, with a real Scorer that fails on one text and can be held mid-batch, so that the failing request
    and a good one queue up together and share the next batch."""

    class FailingScorer(HeldScorer):
        def score(self, texts):
            if any("fail" in text for text in texts):
                raise RuntimeError("no score for this one")
            return super().score(texts)

    scorer = FailingScorer(tiny_pm)
    httpd = in_process_server(serve_pm.Batcher(serve_pm.PMRater(scorer), 8))
    client = Client(*httpd.server_address)
    try:
        answers = {}
        posts = {"hold": ["hold"], "bad": ["good", "fail"], "good": ["good", "also good"]}
        threads = {name: threading.Thread(target=lambda n=name: answers.update({n: client.post({"query": posts[n]})}))
                   for name in posts}
        threads["hold"].start()
        assert scorer.held.wait(30)  # the model thread is busy: the next two requests queue up behind it
        threads["bad"].start()
        threads["good"].start()
        deadline = time.monotonic() + 30
        while httpd.batcher.queue.qsize() < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        scorer.hold.set()
        for thread in threads.values():
            thread.join(30)
        assert answers["bad"] == (500, {"error": "scoring failed: RuntimeError: no score for this one"})
        assert answers["good"][0] == 200
        assert answers["good"][1]["rewards"] == pytest.approx(Scorer(tiny_pm).score(posts["good"]), abs=1e-5)
        assert client.get("/health")[1]["failed"] == 1
        assert client.rewards(["good"]) == pytest.approx(answers["good"][1]["rewards"][:1], abs=1e-5)
    finally:
        httpd.shutdown()
        httpd.server_close()
        httpd.batcher.stop()


def test_drain_closes_idle_connections_answers_the_request_in_flight_and_leaves_no_thread(tiny_pm):
    """In process, with the model thread held mid-batch when serving stops: a client idle on a kept-alive connection
    is closed at once, the held request still gets its rewards, and no connection thread outlives drain()."""
    threads_before = set(threading.enumerate())
    scorer = HeldScorer(tiny_pm)
    httpd = in_process_server(serve_pm.Batcher(serve_pm.PMRater(scorer), 8))
    host, port = httpd.server_address[:2]
    idle = http.client.HTTPConnection(host, port, timeout=30)
    idle.request("GET", "/health")
    assert idle.getresponse().read()  # answered; the connection stays open, its thread waiting for more
    answers = {}
    in_flight = threading.Thread(target=lambda: answers.update(held=Client(host, port).post({"query": ["hold"]})))
    in_flight.start()
    assert scorer.held.wait(30)
    httpd.shutdown()
    httpd.serving.join()
    drained = {}
    draining = threading.Thread(target=lambda: drained.update(left=httpd.drain()))
    draining.start()
    idle.sock.settimeout(10)
    assert idle.sock.recv(1) == b""  # closed by the server while the held batch is still being scored
    assert "held" not in answers
    scorer.hold.set()
    draining.join(30)
    in_flight.join(30)
    httpd.server_close()
    idle.close()
    assert drained == {"left": 0}
    assert answers["held"][0] == 200
    assert answers["held"][1]["rewards"] == pytest.approx(Scorer(tiny_pm).score(["hold"]), abs=1e-5)
    assert set(threading.enumerate()) <= threads_before  # the model thread and every connection thread ended


def test_texts_sent_after_the_model_thread_ended_are_refused_not_left_waiting(tiny_pm):
    batcher = serve_pm.Batcher(serve_pm.PMRater(Scorer(tiny_pm)), 8)
    assert batcher.score(["before"])[0]
    batcher.stop()
    outcome = []

    def late():
        try:
            batcher.score(["after"])
            outcome.append("answered")
        except serve_pm.Stopping as error:
            outcome.append(str(error))

    thread = threading.Thread(target=late, daemon=True)
    thread.start()
    thread.join(10)
    assert outcome == ["the server is stopping"]
    httpd = in_process_server(batcher)  # a request read in the last moment
    try:
        status, answer = Client(*httpd.server_address).post({"query": ["after"]})
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert (status, answer) == (503, {"error": "the server is stopping: send the request to another server"})


# The process ---------------------------------------------------------------------------------------------------


def test_sigterm_ends_the_server_cleanly(tiny_pm, tmp_path):
    running = Server(tmp_path, "--pm", tiny_pm, "--log-every", "1")
    running.rewards(["\n\nHuman: hi\n\nAssistant: hello"])
    idle = http.client.HTTPConnection(running.host, running.port, timeout=60)
    idle.request("GET", "/health")
    assert idle.getresponse().read()  # a client that keeps its connection open when the server is stopped
    status = running.stop()
    idle.close()
    stderr = running.log.read_text()
    assert status == 0, stderr
    assert "serve-pm stopped" in stderr and "Traceback" not in stderr
    assert "still busy" not in stderr  # the idle connection was closed at once, not waited out
    assert "serve-pm: 1 requests, 1 texts" in stderr  # --log-every 1
    assert "127.0.0.1 is loopback, only this machine can connect; no key" in stderr  # and served without one


def test_bad_options_fail_before_any_model_loads(tiny_pm):
    from caictl.errors import UsageError

    with pytest.raises(UsageError, match="--port 70000.*--batch-size"):
        serve_pm.run(serve_pm.ServePMConfig(pm=str(tiny_pm), port=70000, batch_size=0))
