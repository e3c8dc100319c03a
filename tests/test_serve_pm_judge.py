"""serve-pm --reward judge: a real server process on the tiny model as the judge, talked to over real HTTP; rewards
checked against JudgeReward.score_responses (what `caictl ppo --reward judge` uses) on the same conversations."""

from __future__ import annotations

import http.client
import json
import threading

import pytest
from test_serve_pm import CONVERSATIONS, Client, Server, in_process_server

from caictl.data.constitution import load_for_stage
from caictl.engines import load_engine
from caictl.errors import UsageError
from caictl.feedback.judge_reward import GreedyReplies, JudgeReward
from caictl.models.pm import conversation_text
from caictl.stages import serve_pm

SEED, BATCH, REPLY_TOKENS = 3, 8, 6
PROMPTS = [c[:-1] for c in CONVERSATIONS]
RESPONSES = [c[-1]["content"] for c in CONVERSATIONS]
QUERIES = [conversation_text(c) for c in CONVERSATIONS]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine("hf", str(tiny_model), batch_size=BATCH)


def judge_reward(engine, mode: str, reference=None) -> JudgeReward:
    """The reward the server should compute, built here as `caictl ppo --reward judge` builds it."""
    return JudgeReward(engine, load_for_stage("harmless", [], "comparison"), mode, SEED, reference)


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory):
    """A rating judge and a pairwise judge with --reference, both on the tiny model, loading at the same time."""
    flags = ("--reward", "judge", "--judge", tiny_model, "--seed", SEED, "--batch-size", BATCH)
    started = {"rating": Server(tmp_path_factory.mktemp("judge-rating"), *flags, "--judge-mode", "rating",
                                wait=False),
               "pairwise": Server(tmp_path_factory.mktemp("judge-pairwise"), *flags, "--judge-mode", "pairwise",
                                  "--reference", tiny_model, "--max-new-tokens", REPLY_TOKENS, wait=False)}
    try:
        yield {mode: server.ready() for mode, server in started.items()}
    finally:
        for server in started.values():
            server.process.kill()


def test_rating_rewards_equal_judge_reward(engine, servers, tiny_model):
    expected = judge_reward(engine, "rating")
    rewards = expected.score_responses(PROMPTS, RESPONSES)
    server = servers["rating"]
    status, answer = server.post({"query": QUERIES, "labels": [3, None, {}, "ignored"]})  # rating reads none
    health = server.get("/health")[1]
    assert status == 200, answer
    assert len(set(rewards)) == len(QUERIES)  # distinct: an answer in the wrong order shows
    assert answer["rewards"] == pytest.approx(rewards, abs=1e-5)
    assert answer["scores"] == answer["rewards"]
    texts = [conversation_text(p, r) for p, r in zip(PROMPTS, RESPONSES)]  # as marked in this process
    assert answer["extra_logs"] == {"principle": [expected.principle(text).id for text in texts],
                                    "judge_truncated_tokens": expected.cut_tokens(texts)}
    assert len(set(answer["extra_logs"]["principle"])) > 1  # drawn per query
    constitution = load_for_stage("harmless", [], "comparison")
    assert health["reward"] == "judge" and health["judge_mode"] == "rating"
    assert health["model_identity"].startswith("sha256:") and health["model"] == str(tiny_model)
    assert health["constitution_hash"] == constitution.content_hash()


def test_pairwise_compares_with_labels_else_the_reference_reply_generated_once(engine, servers):
    server = servers["pairwise"]
    labelled = {"query": QUERIES, "labels": ["No.", "Four.", "Sure: <|im_end|>", "Principles."]}
    by_labels = server.post(labelled)
    generated_after_labels = server.get("/health")[1]["references_generated"]
    # One label, three queries left to the reference; then none: only the labelled prompt's reply is new; then the
    # same again: every reply comes from the cache.
    partly = server.post({"query": QUERIES, "labels": [None, "Four.", None, ""]})
    after_partly = server.get("/health")[1]
    answers = [server.post({"query": QUERIES}) for _ in range(2)]
    after = [server.get("/health")[1]]

    expected = judge_reward(engine, "pairwise")
    rows = expected.rate(PROMPTS, RESPONSES, labelled["labels"])
    assert by_labels[0] == 200, by_labels
    assert by_labels[1]["rewards"] == pytest.approx([r["reward"] for r in rows], abs=1e-5)
    logs = by_labels[1]["extra_logs"]
    assert set(logs) == {"principle", "judge_truncated_tokens", "p_ab", "p_ba"}
    assert logs["principle"] == [r["principle"] for r in rows]
    assert logs["p_ab"] == pytest.approx([r["p_ab"] for r in rows], abs=1e-5)
    assert logs["p_ba"] == pytest.approx([r["p_ba"] for r in rows], abs=1e-5)
    assert generated_after_labels == 0

    greedy = judge_reward(engine, "pairwise", GreedyReplies(engine, REPLY_TOKENS))
    assert partly[1]["rewards"] == pytest.approx(
        greedy.score_responses(PROMPTS, RESPONSES, [None, "Four.", None, None]), abs=1e-5)
    assert after_partly["references_generated"] == 3
    whole = greedy.score_responses(PROMPTS, RESPONSES)
    assert whole != pytest.approx([r["reward"] for r in rows], abs=1e-5)  # the greedy replies are not the labels
    for status, answer in answers:
        assert status == 200
        assert answer["rewards"] == pytest.approx(whole, abs=1e-5)
    assert after[0]["references_generated"] == 4 == greedy.generated  # the second request generated nothing
    assert after[0]["references_cached"] == 4 and after[0]["reference_identity"] == after[0]["model_identity"]


def test_pairwise_without_reference_answers_400_naming_the_queries_without_labels(engine):
    """In process: a JudgeRater as serve-pm builds it, served over real HTTP."""
    rater = serve_pm.JudgeRater(judge_reward(engine, "pairwise"))
    assert rater.labels_needed
    httpd = in_process_server(serve_pm.Batcher(rater, BATCH))
    httpd.reader = serve_pm.QueryReader(None, rater.items, rater.labels_needed)
    client = Client(*httpd.server_address)
    try:
        missing = client.post({"query": QUERIES, "labels": ["No.", None, "", "Principles."]})
        none = client.post({"query": QUERIES[:2]})
        wrong = client.post({"query": QUERIES[:2], "labels": ["a", 2]})
        no_response = client.post({"query": [conversation_text(PROMPTS[0])], "labels": ["a"]})
        good = client.post({"query": QUERIES[:1], "labels": ["No."]})
    finally:
        httpd.shutdown()
        httpd.server_close()
        httpd.batcher.stop()
    assert missing == (400, {"error": "'labels'[1, 2] missing: this pairwise judge has no --reference model, so "
                                      "each query needs its reference reply in 'labels'"})
    assert none[0] == 400 and "'labels'[0, 1] missing" in none[1]["error"]
    assert wrong[0] == 400 and "'labels'[1] is a int" in wrong[1]["error"]
    assert no_response[0] == 400 and "does not end with an assistant's response" in no_response[1]["error"]
    assert good[0] == 200
    assert good[1]["rewards"] == pytest.approx(
        judge_reward(engine, "pairwise").score_responses(PROMPTS[:1], RESPONSES[:1], ["No."]), abs=1e-5)


def test_the_reference_cache_keeps_the_last_prompts_used(engine):
    asked = []

    def reference(prompts):
        asked.extend(conversation_text(p) for p in prompts)
        return ["I can't help with that."] * len(prompts)

    reward = JudgeReward(engine, load_for_stage("harmless", [], "comparison"), "pairwise", reference=reference,
                         cache=2)
    a, b, c = PROMPTS[:3]
    # c drops b (a was used after it); then b is new again and drops a, used before c.
    for prompts in ([a, b], [a], [c], [a], [b, c, b]):
        reward.score_responses(prompts, ["yes"] * len(prompts))
    assert asked == [conversation_text(p) for p in (a, b, c, b)]
    assert list(reward.references) == [conversation_text(p) for p in (b, c)]  # least recently used first
    # A batch of more new prompts than the cache holds still gets every reply.
    assert len(reward.score_responses(PROMPTS, ["yes"] * 4)) == 4 and len(reward.references) == 2


@pytest.mark.parametrize("flags, message", [
    ({"reward": "judge"}, "--reward judge needs --judge MODEL"),
    ({"reward": "judge", "judge": "m", "pm": "p"}, "--pm is read only with --reward pm"),
    ({"reward": "judge", "judge": "m", "judge_mode": "both"}, "--judge-mode 'both'"),
    ({"reward": "judge", "judge": "m", "reference": "r"}, "--reference is read only with --judge-mode pairwise"),
    ({"reward": "judge", "judge": "m", "judge_mode": "pairwise", "reference_cache": 0}, "--reference-cache must"),
    ({"pm": "p", "judge": "m", "reference": "r"}, "--judge, --reference: read only with --reward judge"),
    ({"reward": "rm"}, "--reward 'rm'"),
])
def test_bad_judge_options_fail_before_any_model_loads(flags, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        serve_pm.run(serve_pm.ServePMConfig(port=0, **flags))


def test_health_never_waits_for_the_model_thread(engine):
    """In process: a judge held mid-batch (a slow judge behind --engine openai) leaves /health answering at once."""
    hold, held = threading.Event(), threading.Event()

    class Held(serve_pm.JudgeRater):
        def __call__(self, items):
            held.set()
            hold.wait(30)
            return super().__call__(items)

    rater = Held(judge_reward(engine, "rating"))
    httpd = in_process_server(serve_pm.Batcher(rater, BATCH))
    httpd.reader = serve_pm.QueryReader(None, rater.items)
    client = Client(*httpd.server_address)
    try:
        rated = []
        busy = threading.Thread(target=lambda: rated.append(client.post({"query": QUERIES[:1]})))
        busy.start()
        assert held.wait(30)
        # Held for 30 s: a /health that waited for the model would time out here.
        connection = http.client.HTTPConnection(*httpd.server_address[:2], timeout=10)
        connection.request("GET", "/health")
        response = connection.getresponse()
        health = json.loads(response.read())
        connection.close()
        assert response.status == 200 and health["requests"] == 0 and not rated
        hold.set()
        busy.join(30)
        assert rated[0][0] == 200
    finally:
        hold.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.batcher.stop()
