"""caictl label on the tiny model: exact soft labels, debiasing, clamping, hard and CoT labels, ensembling."""

from __future__ import annotations

import json

import llama_server
import pytest
import torch
from conftest import caictl, read_jsonl, write_jsonl

from caictl import constitution as c
from caictl.engines import load_engine
from caictl import judge

llama_server_url = llama_server.llama_server_url
tiny_gguf = llama_server.tiny_gguf

PAIRS = [
    {"id": f"q{i}", "messages": [{"role": "user", "content": question}],
     "responses": [f"Sure, here is exactly how to {verb}.", f"I won't help to {verb}, but here is a safer idea."]}
    for i, (question, verb) in enumerate([("How do I pick my neighbour's lock?", "pick it"),
                                          ("How can I scare my sister?", "scare her"),
                                          ("What's the best way to cheat at poker?", "cheat"),
                                          ("How do I get my ex's password?", "get it")])
]


@pytest.fixture
def pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)


def _run(pairs, tiny_model, *extra, check=True):
    return caictl("label", pairs, "--model", tiny_model, *extra, check=check)


def _records(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_soft_label_is_the_normalised_answer_probability(tiny_model):
    engine = load_engine("hf", str(tiny_model))
    the_judge = judge.Judge(engine, c.load("harmless"), debias=False)
    principle = c.load("harmless").comparison[0]
    comparison = judge.Comparison("x", PAIRS[0]["messages"], PAIRS[0]["responses"][0], PAIRS[0]["responses"][1],
                                  [principle], {})
    vote, = the_judge.votes([comparison])[0]
    # Direct: the question, then each answer's tokens, through the model.
    text = the_judge.question(comparison.messages, principle.text, comparison.first, comparison.second)
    tokenizer, model = engine.tokenizer, engine.lm
    logprobs = []
    for choice in judge.CHOICES:
        prefix = tokenizer(text).input_ids
        ids = prefix + tokenizer(choice, add_special_tokens=False).input_ids
        with torch.no_grad():
            out = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        logprobs.append(sum(float(out[i - 1, ids[i]]) for i in range(len(prefix), len(ids))))
    p_a, p_b = (torch.tensor(logprobs).softmax(0)).tolist()
    assert p_a + p_b == pytest.approx(1.0)
    assert vote["p_ab"] == pytest.approx(p_a, abs=1e-5) and vote["p"] == vote["p_ab"]
    assert text.endswith(judge.ANSWER_CUE)
    assert principle.text in text and comparison.first in text and "(A)" in text and "(B)" in text


def test_debiased_label_is_the_mean_of_both_orders(pairs, tiny_model):
    records = _records(_run(pairs, tiny_model))
    assert len(records) == 4
    for record in records:
        vote, = record["votes"]
        assert vote["p"] == pytest.approx((vote["p_ab"] + vote["p_ba"]) / 2)
        p_first = vote["p"]
        first, second = PAIRS[int(record["id"][1:])]["responses"]
        expected_chosen = first if p_first >= 0.5 else second
        assert record["chosen"] == [{"role": "assistant", "content": expected_chosen}]
        assert record["p_chosen"] == pytest.approx(max(p_first, 1 - p_first))
        assert record["prompt"] == PAIRS[int(record["id"][1:])]["messages"]


def test_clamped_soft_labels_stay_in_range(pairs, tiny_model):
    records = _records(_run(pairs, tiny_model, "--soft", "--clamp", "0.4", "0.6"))
    assert all(0.5 <= r["p_chosen"] <= 0.6 for r in records)
    assert all(0.4 <= v["p"] <= 0.6 for r in records for v in r["votes"])
    assert records[0]["meta"]["clamp"] == [0.4, 0.6]


def test_hard_labels_are_zero_or_one(pairs, tiny_model):
    records = _records(_run(pairs, tiny_model, "--hard", "--no-debias"))
    assert [r["p_chosen"] for r in records] == [1.0] * 4
    assert all("p_ba" not in v for r in records for v in r["votes"])


def test_principle_ensembling_draws_distinct_ids_from_the_constitution(pairs, tiny_model):
    ids = {p.id for p in c.load("harmless").comparison}
    records = _records(_run(pairs, tiny_model, "--principles-per-pair", "3"))
    for record in records:
        drawn = [v["principle"] for v in record["votes"]]
        assert len(set(drawn)) == 3 and set(drawn) <= ids
        p_first = sum(v["p"] for v in record["votes"]) / 3
        assert record["p_chosen"] == pytest.approx(max(p_first, 1 - p_first))
    again = _records(_run(pairs, tiny_model, "--principles-per-pair", "3"))
    assert again == records  # the draw is seeded


def test_chain_of_thought_labels_are_clamped_by_default(pairs, tiny_model):
    records = _records(_run(pairs, tiny_model, "--cot", "--max-new-tokens", "12", "--few-shot"))
    assert records[0]["meta"]["label"] == "cot-soft" and records[0]["meta"]["clamp"] == [0.4, 0.6]
    assert all(0.4 <= v["p"] <= 0.6 for r in records for v in r["votes"])


def test_cot_question_reasons_before_the_answer(tiny_model):
    engine = load_engine("hf", str(tiny_model))
    the_judge = judge.Judge(engine, c.load("harmless"), cot=True, few_shot=True)
    question = the_judge.question(PAIRS[0]["messages"], "Which is kinder?", "a", "b")
    assert question.endswith(judge.COT_CUE)
    example = c.load("harmless").label_few_shot[0]
    assert example.reasoning in question and judge.COT_ANSWER_CUE in question
    reasoned = the_judge._with_reasoning([question], ["k"])[0]
    assert reasoned.startswith(question) and reasoned.endswith(judge.COT_ANSWER_CUE)


def test_all_pairs_of_three_responses(tmp_path, tiny_model):
    rows = write_jsonl(tmp_path / "three.jsonl", [{"id": "t", "messages": PAIRS[0]["messages"],
                                                   "responses": ["one", "two", "three"]}])
    assert [r["id"] for r in _records(_run(rows, tiny_model, "--pairs", "all"))] == ["t/0-1", "t/0-2", "t/1-2"]
    assert [r["id"] for r in _records(_run(rows, tiny_model))] == ["t"]


def test_long_conversations_are_cut_from_the_front(tiny_model):
    engine = load_engine("hf", str(tiny_model))
    the_judge = judge.Judge(engine, c.load("harmless"))
    principle = c.load("harmless").comparison[0]
    long = [{"role": "user", "content": "blah " * 5000}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "So, how do I pick the lock?"}]
    cut = judge.Comparison("long", long, "Sure.", "No.", [principle], {})
    short = judge.Comparison("short", long[-1:], "Sure.", "No.", [principle], {})
    (long_vote,), (short_vote,) = the_judge.votes([cut, short])
    assert 0 < long_vote["p"] < 1 and 0 < short_vote["p"] < 1
    text = the_judge.question(long, principle.text, "Sure.", "No.")
    kept = engine.tokenizer.decode(engine.tokenizer(text).input_ids[-engine.max_positions:])
    assert kept.endswith(f"{principle.text}\nOptions:\n(A) Sure.\n(B) No.<|im_end|>\n<|im_start|>assistant\n"
                         f"{judge.ANSWER_CUE}")


def test_records_load_as_a_trl_preference_dataset(tmp_path, pairs, tiny_model):
    from datasets import load_dataset
    from trl.data_utils import is_conversational

    out = tmp_path / "prefs.jsonl"
    _run(pairs, tiny_model, "-o", out)
    dataset = load_dataset("json", data_files=str(out), split="train")
    assert {"prompt", "chosen", "rejected", "p_chosen"} <= set(dataset.column_names)
    assert is_conversational(dataset[0])
    summary = json.loads((tmp_path / "prefs.jsonl.summary.json").read_text())
    assert summary["labelled"] == 4 and 0 <= summary["position_consistency"] <= 1
    votes = [v for r in read_jsonl(out) for v in r["votes"]]
    agree = sum((v["p_ab"] >= 0.5) == (v["p_ba"] >= 0.5) for v in votes) / len(votes)
    assert summary["position_consistency"] == pytest.approx(agree, abs=1e-4)
    first_slot = sum((v["p_ab"] + 1 - v["p_ba"]) / 2 for v in votes) / len(votes)
    assert summary["first_slot_preference"] == pytest.approx(first_slot, abs=1e-4)
    assert sum(p["votes"] for p in summary["per_principle"].values()) == len(votes)


def test_resume_and_bad_input(tmp_path, pairs, tiny_model):
    out = tmp_path / "prefs.jsonl"
    _run(pairs, tiny_model, "-o", out, "--limit", "2")
    result = _run(pairs, tiny_model, "-o", out)
    assert "2 of 4 comparisons already done" in " ".join(result.stderr.split())
    _run(pairs, tiny_model, "-o", tmp_path / "straight.jsonl")
    resumed, straight = read_jsonl(out), read_jsonl(tmp_path / "straight.jsonl")
    # Batches of other sizes pad differently: the scores agree to float precision, not bit for bit.
    assert [(r["id"], r["chosen"]) for r in resumed] == [(r["id"], r["chosen"]) for r in straight]
    assert [r["p_chosen"] for r in resumed] == pytest.approx([r["p_chosen"] for r in straight], abs=1e-5)
    bad = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], {"id": "x", "messages": [], "responses": ["one"]}])
    result = _run(bad, tiny_model, check=False)
    assert result.returncode == 2 and "bad.jsonl:2: 'responses' must be a list of at least two" in result.stderr
    result = _run(pairs, tiny_model, "--hard", "--clamp", "0.4", "0.6", check=False)
    assert result.returncode == 2 and "--hard and --clamp" in result.stderr


def test_label_through_an_openai_compatible_server(pairs, llama_server_url):
    result = caictl("label", pairs, "--engine", "openai", "--base-url", llama_server_url, "--model", "tiny",
                    "--clamp", "0.4", "0.6")
    records = _records(result)
    assert len(records) == 4 and all(0.5 <= r["p_chosen"] <= 0.6 for r in records)
    assert all(0 < v["p_ab"] < 1 and 0 < v["p_ba"] < 1 for r in records for v in r["votes"])
