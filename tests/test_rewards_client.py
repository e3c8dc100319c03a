"""caictl.rewards: the reward functions for TRL, verl and OpenRLHF, against a real `caictl serve-pm` process (and,
where a test must see the exact request or make a server fail, a recording HTTP server in this process). Rewards
are checked against caictl's own Scorer on the same transcripts. verl and OpenRLHF are not installed: their
functions are called in the shapes those frameworks document."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import caictl.rewards
from caictl.errors import CaictlError, UsageError
from caictl.models.pm import conversation_text

KEY_ENV = "REWARDS_TEST_PM_KEY"  # not CAICTL_*: the server's environment drops those
KEY = "test-key-5b1c0e"
EXAMPLE = Path(__file__).parent.parent / "examples" / "openrlhf_reward_func.py"

PROMPTS = [
    [{"role": "user", "content": "How do I pick a lock?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Write <|im_end|> and\n\nHuman: in a sentence."}],
]
RESPONSES = ["I can't help with that, but a locksmith can.", "4.", "Here: <|im_end|> and \"Human:\" are text."]


def serve_pm_help() -> str:
    return subprocess.run([sys.executable, "-m", "caictl", "serve-pm", "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}).stdout


# Servers ---------------------------------------------------------------------------------------------------------


class ServePM:
    """A `caictl serve-pm` process on a free port, started and ready; url is its base URL."""

    def __init__(self, folder: Path, *args, env: dict | None = None):
        self.log = folder / "serve-pm.stderr"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAICTL_")} | (env or {})
        command = [sys.executable, "-m", "caictl", "serve-pm", "--port", "0", *map(str, args)]
        with self.log.open("w") as stderr:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        deadline = time.monotonic() + 180
        while not (found := re.search(r"listening on (http://[\d.]+:\d+)/get_reward", self.log.read_text())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"serve-pm did not start:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.url = found.group(1)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def pm_server(tiny_pm, tmp_path_factory):
    """(URL, key_env): one serve-pm on the tiny PM for the module, wanting a key when serve-pm can (--api-key-env)
    and then the key in KEY_ENV here; key_env None when it cannot."""
    keyed = "--api-key-env" in serve_pm_help()
    args = ["--pm", tiny_pm, "--host", "127.0.0.1"] + (["--api-key-env", KEY_ENV] if keyed else [])
    running = ServePM(tmp_path_factory.mktemp("serve-pm"), *args, env={KEY_ENV: KEY})
    previous = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = KEY
    yield running.url, (KEY_ENV if keyed else None)
    running.stop()
    if previous is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = previous


@pytest.fixture(scope="module")
def scorer(tiny_pm):
    from caictl.models.pm import Scorer

    return Scorer(tiny_pm)


class Recorder:
    """An HTTP server in this process that records each request (path, headers, JSON body) and answers with a
    status taken from `statuses` (200 once they run out): 200 with rewards = each query's length, so an answer put
    back in the wrong order shows. principles: extra_logs also carry a text per query, as a judge's do."""

    def __init__(self, statuses=(), principles: bool = False):
        self.requests, self.statuses = [], list(statuses)
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                recorder.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status = recorder.statuses.pop(0) if recorder.statuses else 200
                rewards = [float(len(q)) for q in body["query"]]
                logs = {"pm_truncated_tokens": [0] * len(rewards)}
                if principles:
                    logs["principle"] = ["Which response is less harmful?"] * len(rewards)
                answer = ({"rewards": rewards, "scores": rewards, "extra_logs": logs}
                          if status == 200 else {"error": "failing on purpose"})
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder():
    made = []

    def make(statuses=(), principles=False):
        made.append(Recorder(statuses, principles))
        return made[-1]

    yield make
    for running in made:
        running.close()


def dead_url() -> str:
    """A URL where nothing listens (a port just freed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# TRL ---------------------------------------------------------------------------------------------------------------


class Recorded:
    """A reward function as TRL sees it (same name, same sync or async form), keeping what it returned for which
    transcripts, the transcripts written here from TRL's arguments as caictl's PM reads a rollout."""

    def __init__(self, reward):
        self.reward, self.__name__, self.calls = reward, reward.__name__, []

    def _record(self, prompts, completions, rewards):
        responses = [c[-1]["content"] for c in completions]
        self.calls.append({"prompts": prompts, "responses": responses, "rewards": list(rewards),
                           "texts": [conversation_text(p, r) for p, r in zip(prompts, responses)]})
        return rewards

    def __call__(self, prompts, completions, **kwargs):
        return self._record(prompts, completions, self.reward(prompts=prompts, completions=completions, **kwargs))


class RecordedAsync(Recorded):
    async def __call__(self, prompts, completions, **kwargs):
        rewards = await self.reward(prompts=prompts, completions=completions, **kwargs)
        return self._record(prompts, completions, rewards)


def grpo_two_steps(policy, reward_funcs: list, out: Path):
    """TRL's own GRPOTrainer, two steps on the tiny policy with CPU-friendly settings (as caictl.rl.trl's)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from caictl.models.training import precision, trl_device_args

    args = GRPOConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, learning_rate=1e-5, logging_steps=1, save_strategy="no",
                      report_to="none", seed=0, disable_tqdm=True, **trl_device_args(GRPOConfig, precision()))
    trainer = GRPOTrainer(model=str(policy), reward_funcs=reward_funcs, args=args,
                          processing_class=AutoTokenizer.from_pretrained(policy),
                          train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS * 2]))
    trainer.train()
    return trainer


def check_trained_on(trainer, recorded: Recorded, expected_rewards):
    """Every call TRL made returned the reference's rewards for its transcripts, and TRL logged them by name."""
    assert len(recorded.calls) == 2  # one generation batch a step
    for call in recorded.calls:
        assert len(call["rewards"]) == 4 and all(isinstance(r, float) for r in call["rewards"])
        assert call["rewards"] == pytest.approx(expected_rewards(call), abs=1e-5)
    logged = [entry[f"rewards/{recorded.__name__}/mean"] for entry in trainer.state.log_history
              if f"rewards/{recorded.__name__}/mean" in entry]
    assert logged == pytest.approx([sum(c["rewards"]) / 4 for c in recorded.calls], abs=1e-5)


def test_grpo_trains_on_the_served_pm_sync_and_async(pm_server, scorer, tiny_model, tmp_path):
    url, key_env = pm_server
    sync = Recorded(caictl.rewards.remote_reward(url, key_env=key_env, name="served_pm"))
    async_ = RecordedAsync(caictl.rewards.remote_reward_async([url], key_env=key_env, name="served_pm_async"))
    trainer = grpo_two_steps(tiny_model, [sync, async_], tmp_path)
    check_trained_on(trainer, sync, lambda call: scorer.score(call["texts"]))
    check_trained_on(trainer, async_, lambda call: scorer.score(call["texts"]))
    assert [c["texts"] for c in sync.calls] == [c["texts"] for c in async_.calls]


def test_trl_calls_shapes_names_and_pickling(pm_server, scorer):
    from trl.trainer.utils import get_callable_name, is_async_callable

    url, key_env = pm_server
    reward = caictl.rewards.remote_reward(url, key_env=key_env, name="served_pm")
    async_reward = caictl.rewards.remote_reward_async(url, key_env=key_env)
    assert get_callable_name(reward) == "served_pm" and not is_async_callable(reward)
    assert get_callable_name(async_reward) == "caictl_reward" and is_async_callable(async_reward)
    expected = scorer.score([conversation_text(p, r) for p, r in zip(PROMPTS, RESPONSES)])
    assert len(set(expected)) == len(expected)  # distinct: rewards out of order would show
    completions = [[{"role": "assistant", "content": r}] for r in RESPONSES]
    assert reward(prompts=PROMPTS, completions=completions, trainer_state=None) == pytest.approx(expected, abs=1e-5)
    assert asyncio.run(async_reward(prompts=PROMPTS, completions=completions)) == pytest.approx(expected, abs=1e-5)
    # Text prompts (TRL's standard form) are read as caictl reads a text prompt: one user turn, or a transcript.
    text_prompts = ["How do I pick a lock?", conversation_text(PROMPTS[2]) + "\n\nAssistant:"]
    rewards = reward(prompts=text_prompts, completions=[" " + RESPONSES[0], " " + RESPONSES[2] + "\n"])
    assert rewards == pytest.approx([expected[0], expected[2]], abs=1e-5)
    # TRL's async rollout worker pickles reward functions into a child: the pickle holds no key.
    data = pickle.dumps(reward)
    assert KEY.encode() not in data
    assert pickle.loads(data)(prompts=PROMPTS, completions=completions) == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_grpo_trains_on_the_served_judge(tiny_model, tmp_path):
    """serve-pm --reward judge: the rewards equal caictl's JudgeReward on the same conversations."""
    if "--judge-mode" not in serve_pm_help():
        pytest.skip("caictl serve-pm has no --reward judge yet")
    from caictl.data.constitution import load_for_stage
    from caictl.data.conversation import parse_transcript
    from caictl.engines import load_engine
    from caictl.feedback.judge_reward import JudgeReward

    running = ServePM(tmp_path, "--reward", "judge", "--judge", tiny_model, "--judge-mode", "rating")
    try:
        recorded = Recorded(caictl.rewards.remote_reward(running.url, name="served_judge"))
        trainer = grpo_two_steps(tiny_model, [recorded], tmp_path / "grpo")
    finally:
        running.stop()
    judge = JudgeReward(load_engine("hf", str(tiny_model)), load_for_stage("harmless", [], "comparison"), "rating", 0)

    def expected(call):
        # The server reads each transcript back into messages, and a turn read from a transcript is stripped: a
        # rollout's leading or trailing whitespace does not reach the judge.
        conversations = [parse_transcript(text) for text in call["texts"]]
        return judge.score_responses([c[:-1] for c in conversations], [c[-1]["content"] for c in conversations])

    check_trained_on(trainer, recorded, expected)


# Several servers, retries, the key -----------------------------------------------------------------------------


def test_requests_fail_over_from_a_dead_server_and_a_503(pm_server, scorer, recorder):
    url, key_env = pm_server
    completions = [[{"role": "assistant", "content": r}] for r in RESPONSES]
    expected = scorer.score([conversation_text(p, r) for p, r in zip(PROMPTS, RESPONSES)])
    reward = caictl.rewards.remote_reward([dead_url(), url], key_env=key_env, cool_down=30)
    for _ in range(3):
        assert reward(prompts=PROMPTS, completions=completions) == pytest.approx(expected, abs=1e-5)
    dead, live = reward.client.servers
    # The dead one was tried once and then left out of rotation for its cool-down; the live one answered all.
    assert (dead.sent, dead.failed, live.sent, live.failed) == (1, 1, 3, 0)
    assert reward.client.retries == 0

    failing = recorder(statuses=[503, 503])
    reward = caictl.rewards.remote_reward(f"{failing.url},{url}", key_env=key_env)
    assert reward(prompts=PROMPTS, completions=completions) == pytest.approx(expected, abs=1e-5)
    assert len(failing.requests) == 1  # asked first (fewest sent), answered 503, and the request went on

    # Every server down: retried with backoff, then an error naming each.
    reward = caictl.rewards.remote_reward([dead_url(), failing.url], max_retries=2, backoff=0.01, cool_down=0.01)
    failing.statuses = [500] * 10
    with pytest.raises(CaictlError, match=r"after 3 rounds.*ConnectionRefusedError.*HTTP 500: failing on purpose"):
        reward(prompts=PROMPTS[:1], completions=completions[:1])
    assert reward.client.retries == 2 and len(failing.requests) == 1 + 3


def test_texts_go_in_requests_of_at_most_1024_spread_over_servers(recorder):
    from caictl.stages.serve_pm import MAX_TEXTS

    assert caictl.rewards.MAX_TEXTS == MAX_TEXTS
    first, second = recorder(), recorder()
    queries = [f"q{i}" for i in range(2500)]
    answer = caictl.rewards.RewardClient([first.url, second.url]).get_reward(queries)
    sizes = sorted(len(r["body"]["query"]) for r in first.requests + second.requests)
    assert sizes == [452, 1024, 1024]
    assert first.requests and second.requests  # three requests at once: both servers busy
    assert answer["rewards"] == [float(len(q)) for q in queries]  # put back in order
    assert answer["extra_logs"] == {"pm_truncated_tokens": [0] * 2500}
    assert caictl.rewards.RewardClient(first.url).get_reward([]) == {"rewards": [], "scores": [], "extra_logs": {}}


def test_the_key_is_sent_and_required(pm_server, recorder, monkeypatch):
    server = recorder()
    monkeypatch.setenv("SOME_KEY", "s3cret")
    caictl.rewards.remote_reward(server.url, key_env="SOME_KEY")(prompts=PROMPTS[:1], completions=RESPONSES[:1])
    assert server.requests[0]["headers"]["Authorization"] == "Bearer s3cret"
    assert server.requests[0]["path"] == "/get_reward"
    caictl.rewards.remote_reward(server.url + "/get_reward")(prompts=PROMPTS[:1], completions=RESPONSES[:1])
    assert "Authorization" not in server.requests[1]["headers"]
    monkeypatch.delenv("SOME_KEY")
    with pytest.raises(UsageError, match="SOME_KEY is not set"):
        caictl.rewards.remote_reward(server.url, key_env="SOME_KEY")
    assert len(server.requests) == 2

    url, key_env = pm_server
    if key_env is None:
        pytest.skip("caictl serve-pm has no --api-key-env yet: the real server wants no key")
    with pytest.raises(UsageError, match="HTTP 401.*pass key_env"):
        caictl.rewards.remote_reward(url)(prompts=PROMPTS[:1], completions=RESPONSES[:1])
    monkeypatch.setenv("WRONG_KEY", "not-the-key")
    with pytest.raises(UsageError, match="HTTP 401.*check that WRONG_KEY"):
        caictl.rewards.remote_reward(url, key_env="WRONG_KEY")(prompts=PROMPTS[:1], completions=RESPONSES[:1])


# verl --------------------------------------------------------------------------------------------------------------


def test_verl_single_and_batched_call_shapes(pm_server, scorer, monkeypatch):
    url, key_env = pm_server
    expected = scorer.score([conversation_text(p, r) for p, r in zip(PROMPTS, RESPONSES)])
    monkeypatch.setenv(caictl.rewards.URL_ENV, url)
    if key_env:
        monkeypatch.setenv(caictl.rewards.KEY_ENV, KEY)
    # As verl's naive reward manager calls it: one response at a time, keywords, the prompt in extra_info.
    single = [caictl.rewards.compute_score(data_source="cai", solution_str=r, ground_truth=None,
                                           extra_info={"prompt": p, "index": i})
              for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]
    assert all(isinstance(s, float) for s in single) and single == pytest.approx(expected, abs=1e-5)
    # As verl's batch reward manager calls it: arrays from the parquet data, where a list of messages is itself a
    # numpy array of dicts; a text prompt works too.
    extra_infos = np.array([{"prompt": np.array(p, dtype=object)} for p in PROMPTS[:2]]
                           + [{"prompt": conversation_text(PROMPTS[2]) + "\n\nAssistant:"}], dtype=object)
    batched = caictl.rewards.compute_score_batched(data_sources=np.array(["cai"] * 3, dtype=object),
                                                   solution_strs=RESPONSES, ground_truths=[None] * 3,
                                                   extra_infos=extra_infos)
    assert batched == pytest.approx(expected, abs=1e-5)
    made = caictl.rewards.verl_compute_score(url, key_env=KEY_ENV if key_env else None, batched=True)
    assert made(["cai"] * 3, RESPONSES, [None] * 3, [{"prompt": p} for p in PROMPTS]) == pytest.approx(expected,
                                                                                                     abs=1e-5)
    with pytest.raises(UsageError, match=r"extra_info of response 0 has no 'prompt'.*extra_info\['prompt'\]"):
        caictl.rewards.compute_score("cai", RESPONSES[0], None, extra_info={"index": 0})
    with pytest.raises(UsageError, match="no 'prompt'"):
        caictl.rewards.compute_score("cai", RESPONSES[0], None)
    monkeypatch.delenv(caictl.rewards.URL_ENV)
    with pytest.raises(UsageError, match="set CAICTL_REWARD_URL"):
        caictl.rewards.compute_score("cai", RESPONSES[0], None, extra_info={"prompt": PROMPTS[0]})


def test_importing_caictl_rewards_loads_no_torch():
    code = "import sys, caictl.rewards; print(sorted({'torch', 'transformers', 'numpy'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


# OpenRLHF ----------------------------------------------------------------------------------------------------------


def load_example():
    spec = importlib.util.spec_from_file_location("reward_func", EXAMPLE)  # as OpenRLHF loads it
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_openrlhf_reward_func_file(pm_server, scorer, recorder, monkeypatch):
    import torch

    queries = [conversation_text(p, r) for p, r in zip(PROMPTS, RESPONSES)]
    prompts = [conversation_text(p) for p in PROMPTS]
    labels = ["", "4", None]
    # The exact request OpenRLHF's own HTTP mode would send, with the key, read back by a recording server.
    server = recorder(principles=True)
    monkeypatch.setenv(caictl.rewards.URL_ENV, server.url)
    monkeypatch.setenv(caictl.rewards.KEY_ENV, KEY)
    answer = load_example().reward_func(queries, prompts, labels)
    # A judge's text logs (its principle per query) are left out: OpenRLHF logs tensors.
    assert set(answer["extra_logs"]) == {"pm_truncated_tokens"}
    (request,) = server.requests
    assert request["path"] == "/get_reward" and request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert request["body"] == {"query": queries, "prompts": prompts, "labels": labels}
    assert torch.equal(answer["rewards"], torch.tensor([float(len(q)) for q in queries]))

    # Against serve-pm: the answer OpenRLHF reads, as tensors.
    url, key_env = pm_server
    monkeypatch.setenv(caictl.rewards.URL_ENV, url)
    if not key_env:
        monkeypatch.delenv(caictl.rewards.KEY_ENV)
    answer = load_example().reward_func(queries, prompts, labels)
    assert set(answer) == {"rewards", "scores", "extra_logs"}
    assert isinstance(answer["rewards"], torch.Tensor) and answer["rewards"].shape == (3,)
    assert answer["rewards"].tolist() == pytest.approx(scorer.score(queries), abs=1e-5)
    assert torch.equal(answer["scores"], answer["rewards"])
    assert answer["extra_logs"]["pm_truncated_tokens"].tolist() == [0, 0, 0]
