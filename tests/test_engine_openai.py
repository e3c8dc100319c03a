"""The openai engine against real servers: llama.cpp serving the tiny model, and a small HTTP server of ours
that answers 429s and 5xx on purpose to exercise retries and the concurrency limit."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import llama_server
import pytest
from conftest import EXAMPLES, caictl, read_jsonl

from caictl.engines import SamplingParams, load_engine
from caictl.errors import CaictlError, UsageError
from caictl.feedback.judge import CHOICES

llama_server_url = llama_server.llama_server_url
tiny_gguf = llama_server.tiny_gguf

CHATS = [[{"role": "user", "content": "Say something about the sea."}],
         [{"role": "user", "content": "Literal {{x}} and {% raw %}"}]]


def test_chat_and_completion_through_llama_cpp(llama_server_url):
    engine = load_engine("openai", "tiny", base_url=llama_server_url, concurrency=2)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=7)
    chats = engine.generate(CHATS, params, ["a", "b"])
    assert len(chats) == 2 and all(g.text and g.completion_tokens > 0 and g.prompt_tokens > 0 for g in chats)
    assert [g.text for g in engine.generate(CHATS, params, ["a", "b"])] == [g.text for g in chats]
    texts = engine.complete(["\n\nHuman: hello\n\nAssistant:"], params, ["c"])
    assert texts[0].text and texts[0].finish_reason in ("stop", "length")


def test_stop_strings_apply_beyond_the_servers_four(llama_server_url):
    engine = load_engine("openai", "tiny", base_url=llama_server_url)
    free = engine.complete(["Once upon a time"], SamplingParams(max_new_tokens=30, seed=1), ["s"])[0].text
    assert len(free) > 6
    stops = ("\x00a", "\x00b", "\x00c", "\x00d", free[3:6])  # the fifth is applied by caictl, not the server
    cut = engine.complete(["Once upon a time"], SamplingParams(max_new_tokens=30, seed=1, stop=stops), ["s"])[0]
    assert free[3:6] not in cut.text and free.startswith(cut.text) and cut.finish_reason == "stop"


def test_choice_logprobs_from_echoed_prompt_logprobs(llama_server_url, tiny_gguf):
    engine = load_engine("openai", "tiny", base_url=llama_server_url)
    texts = ["Which is better? The answer is:", "Pick one:", "\n\nHuman: Which is kinder?\n\nAssistant: The answer is:"]
    scores = engine.choice_logprobs(texts, list(CHOICES)).logprobs
    # The same text through the hf engine on the same weights. The server puts BOS before every completions
    # prompt, so the hf side gets it too. Absolute log-probs differ (the GGUF pushes unprintable tokens far
    # down, which moves the softmax normaliser); the difference between choices that part at their last token,
    # read at the same position, does not.
    hf = load_engine("hf", str(tiny_gguf[0]))
    bos = hf.tokenizer.decode([hf.tokenizer.pad_token_id])
    expected = hf.choice_logprobs([bos + t for t in texts], list(CHOICES)).logprobs
    assert len(scores) == len(texts)
    for (a, b), (hf_a, hf_b) in zip(scores, expected):
        assert math.isfinite(a) and math.isfinite(b) and a != b
        assert a - b == pytest.approx(hf_a - hf_b, abs=1e-5)
    # The same request again gives the same scores: nothing is sampled.
    assert engine.choice_logprobs(texts[1:2], list(CHOICES)).logprobs == scores[1:2]


def test_revise_through_the_server_never_writes_the_key(tmp_path, llama_server_url):
    out = tmp_path / "r.jsonl"
    secret = "sk-test-do-not-leak-1234567890"
    result = caictl("revise", EXAMPLES / "red-team.jsonl", "-o", out, "--engine", "openai", "--base-url",
                    llama_server_url, "--model", "tiny", "--limit", "3", "--rounds", "2", "--max-new-tokens", "12",
                    "--shots", "1", env={"OPENAI_API_KEY": secret})
    records = read_jsonl(out)
    assert len(records) == 3 and all(len(r["steps"]) == 2 for r in records)
    assert records[0]["meta"]["engine"] == "openai"
    assert secret not in out.read_text() and secret not in result.stderr + result.stdout


# A server that misbehaves on purpose ---------------------------------------------------------------------


class FlakyServer:
    """Answers the first `failures` requests with `status`, then a valid chat completion; counts requests
    and the most that were in flight at once."""

    def __init__(self, failures: int = 0, status: int = 429, delay: float = 0.0):
        self.failures, self.status, self.delay = failures, status, delay
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests += 1
                    failing = owner.requests <= owner.failures
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                time.sleep(owner.delay)
                with owner.lock:
                    owner.in_flight -= 1
                if failing:
                    self._send(owner.status, {"error": {"message": "try later"}}, {"Retry-After": "0"})
                    return
                content = "echo: " + body["messages"][-1]["content"]
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky():
    servers = []

    def make(**options):
        servers.append(FlakyServer(**options))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.mark.parametrize("status", [429, 500, 503])
def test_retries_with_backoff_on_429_and_5xx(flaky, status):
    server = flaky(failures=2, status=status)
    engine = load_engine("openai", "m", base_url=server.url, backoff=0.01, max_retries=3)
    out = engine.generate([[{"role": "user", "content": "hi"}]], SamplingParams(), ["k"])
    assert out[0].text == "echo: hi" and engine.retries == 2 and server.requests == 3


def test_gives_up_after_max_retries_with_a_clear_error(flaky):
    server = flaky(failures=10, status=503)
    engine = load_engine("openai", "m", base_url=server.url, backoff=0.01, max_retries=2)
    with pytest.raises(CaictlError, match=r"gave up after 3 attempts \(HTTP 503\)"):
        engine.generate([[{"role": "user", "content": "hi"}]], SamplingParams(), ["k"])
    assert server.requests == 3


def test_client_errors_are_not_retried(flaky):
    server = flaky(failures=10, status=404)
    engine = load_engine("openai", "m", base_url=server.url, backoff=0.01)
    with pytest.raises(UsageError, match="check --model and --base-url"):
        engine.generate([[{"role": "user", "content": "hi"}]], SamplingParams(), ["k"])
    assert server.requests == 1


def test_time_outs_are_retried(flaky):
    server = flaky(delay=0.5)
    engine = load_engine("openai", "m", base_url=server.url, backoff=0.01, max_retries=1, timeout=0.1)
    with pytest.raises(CaictlError, match="gave up after 2 attempts"):
        engine.generate([[{"role": "user", "content": "hi"}]], SamplingParams(), ["k"])
    assert engine.retries == 1


def test_concurrency_stays_under_the_limit(flaky):
    server = flaky(delay=0.05)
    engine = load_engine("openai", "m", base_url=server.url, concurrency=3)
    chats = [[{"role": "user", "content": str(i)}] for i in range(12)]
    out = engine.generate(chats, SamplingParams(), [str(i) for i in range(12)])
    assert [g.text for g in out] == [f"echo: {i}" for i in range(12)]  # answers stay in request order
    assert 1 < server.max_in_flight <= 3


# Several servers: the picking rule, cool-downs and failover ------------------------------------------------

HI = [[{"role": "user", "content": "hi"}]]


def test_each_request_goes_to_the_server_with_the_fewest_in_flight(flaky):
    slow, fast = flaky(delay=1.0), flaky()
    engine = load_engine("openai", "m", base_url=[slow.url, fast.url], concurrency=2)
    chats = [[{"role": "user", "content": str(i)}] for i in range(10)]
    out = engine.generate(chats, SamplingParams(), [str(i) for i in range(10)])
    assert [g.text for g in out] == [f"echo: {i}" for i in range(10)]
    # The slow server takes the first request and holds it for a second; the other nine find it busy.
    assert (slow.requests, fast.requests) == (1, 9)
    assert [(s.sent, s.failed) for s in engine.servers] == [(1, 0), (9, 0)]


def test_one_request_at_a_time_alternates_between_idle_servers(flaky):
    a, b = flaky(), flaky()
    engine = load_engine("openai", "m", base_url=[a.url, b.url], concurrency=1)
    engine.generate(HI * 6, SamplingParams(), [str(i) for i in range(6)])
    assert (a.requests, b.requests) == (3, 3)


def test_a_failing_server_cools_down_while_its_request_moves_on_at_once(flaky):
    failing, healthy = flaky(failures=1, status=503), flaky()
    # A backoff would take seconds: the request must go straight to the other server instead.
    engine = load_engine("openai", "m", base_url=[failing.url, healthy.url], concurrency=1, backoff=10.0,
                         cool_down=0.5)
    start = time.monotonic()
    out = engine.generate(HI * 3, SamplingParams(), ["a", "b", "c"])
    assert [g.text for g in out] == ["echo: hi"] * 3 and time.monotonic() - start < 2.0 and engine.retries == 0
    # Cooling down, it got no more requests; the first one failed over to the healthy server.
    assert (failing.requests, healthy.requests) == (1, 3)
    time.sleep(0.6)  # the cool-down is over: back in rotation, and it answers now
    engine.generate(HI, SamplingParams(), ["d"])
    assert failing.requests == 2
    assert [(s.sent, s.failed, s.last) for s in engine.servers] == [(2, 1, "answered"), (3, 0, "answered")]


def test_a_cool_down_doubles_while_the_server_keeps_failing(flaky):
    failing, healthy = flaky(failures=100, status=500), flaky()
    engine = load_engine("openai", "m", base_url=[failing.url, healthy.url], concurrency=1, cool_down=0.3)
    for pause in (0.35, 0.65):  # past the first cool-down (0.3 s), then past the second (0.6 s)
        engine.generate(HI * 2, SamplingParams(), ["a", "b"])
        time.sleep(pause)
    engine.generate(HI * 2, SamplingParams(), ["a", "b"])
    assert failing.requests == 3  # one try each time it was back, none while it was out
    time.sleep(0.65)  # less than the third cool-down (1.2 s)
    engine.generate(HI * 2, SamplingParams(), ["a", "b"])
    assert (failing.requests, healthy.requests) == (3, 8)


def test_requests_that_fail_together_put_a_server_out_once(flaky):
    # Two requests in flight when the server fails: one outage, so one cool-down, not a doubled one.
    failing, healthy = flaky(failures=2, status=503, delay=0.2), flaky(delay=0.2)
    engine = load_engine("openai", "m", base_url=[failing.url, healthy.url], concurrency=4, cool_down=1.0)
    engine.generate(HI * 4, SamplingParams(), list("abcd"))
    assert (failing.requests, healthy.requests) == (2, 4)
    time.sleep(1.2)  # past the cool-down (1 s), short of a doubled one (2 s)
    engine.generate(HI, SamplingParams(), ["e"])
    assert failing.requests == 3


@pytest.mark.parametrize(("status", "error", "message"), [
    (400, CaictlError, "request refused (HTTP 400)"),
    (401, UsageError, "authentication failed"),
    (404, UsageError, "not found (HTTP 404)"),
])
def test_a_request_refused_for_its_own_fault_is_not_sent_to_another_server(flaky, status, error, message):
    refusing, healthy = flaky(failures=10, status=status), flaky()
    engine = load_engine("openai", "m", base_url=[refusing.url, healthy.url], concurrency=1)
    with pytest.raises(error, match=f"^{refusing.url}: {re.escape(message)}"):
        engine.generate(HI, SamplingParams(), ["k"])
    assert (refusing.requests, healthy.requests) == (1, 0)


def test_the_run_fails_only_when_every_server_has_failed_and_says_what_each_did(flaky):
    busy, broken = flaky(failures=100, status=429), flaky(failures=100, status=503)
    engine = load_engine("openai", "m", base_url=[busy.url, broken.url], backoff=0.01, max_retries=2)
    with pytest.raises(CaictlError) as failed:
        engine.generate(HI, SamplingParams(), ["k"])
    assert str(failed.value).startswith(
        f"every server failed: {busy.url} (HTTP 429; 3 of 3 requests failed), "
        f"{broken.url} (HTTP 503; 3 of 3 requests failed); gave up after 3 rounds of attempts")
    assert engine.retries == 2  # two backoffs, between the three rounds
    # A server that answers in the last round is enough.
    recovering = flaky(failures=3, status=503)
    engine = load_engine("openai", "m", base_url=[broken.url, recovering.url], backoff=0.01, max_retries=3)
    assert engine.generate(HI, SamplingParams(), ["k"])[0].text == "echo: hi" and recovering.requests == 4


def test_missing_base_url_is_a_usage_error():
    with pytest.raises(UsageError, match="needs --base-url"):
        load_engine("openai", "m")


@pytest.mark.slow
def test_every_server_stage_takes_max_retries_and_timeout_from_the_flag_the_environment_or_caictl_yaml(
        flaky, tmp_path):
    server = flaky(failures=100, status=503)
    run = ["sample", EXAMPLES / "red-team.jsonl", "--limit", "1", "-n", "1", "--engine", "openai",
           "--base-url", server.url, "--model", "m"]
    flag = caictl(*run, "--max-retries", "1", check=False)
    assert flag.returncode != 0 and "gave up after 2 attempts (HTTP 503)" in flag.stderr
    assert "raise --max-retries" in flag.stderr
    from_env = caictl(*run, env={"CAICTL_MAX_RETRIES": "0"}, check=False)
    assert "gave up after 1 attempts" in from_env.stderr
    (tmp_path / "caictl.yaml").write_text("max_retries: 2\n")
    from_file = caictl(*run, cwd=tmp_path, check=False)
    assert "gave up after 3 attempts" in from_file.stderr and server.requests == 2 + 1 + 3
    bad = caictl(*run, env={"CAICTL_MAX_RETRIES": "many"}, check=False)
    assert bad.returncode == 2 and "--max-retries 'many'" in bad.stderr

    slow = flaky(delay=2.0)
    timed_out = caictl(*run[:-4], "--base-url", slow.url, "--model", "m", "--timeout", "0.2", "--max-retries", "0",
                       check=False)
    assert "gave up after 1 attempts (APITimeoutError)" in timed_out.stderr
    for stage in (["revise"], ["label"], ["eval", "mc"], ["eval", "compare"]):
        assert "--max-retries" in caictl(*stage, "--help").stdout
        assert "--timeout" in caictl(*stage, "--help").stdout
