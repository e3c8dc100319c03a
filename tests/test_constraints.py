"""Checkable constraints (caictl.data.constraints) on hand-made responses, and eval compare's judge questions chosen by
--set-constitution and its constraint shares, with scripted engines in place of models."""

from __future__ import annotations

import json
import re
from unittest import mock

import pytest
from conftest import EXAMPLES, read_jsonl, write_jsonl
from scripted_engine import ScriptedEngine, question_parts

from caictl.data import constitution as c
from caictl.data import constraints
from caictl.errors import UsageError
from caictl.stages import eval_compare as compare

# (constraint, a response that meets it, a response that violates it): each violation misses by the smallest step.
CASES = [
    ({"type": "bullets", "count": 3}, "Tips:\n- one\n- two\n* three", "- one\n- two\n- three\n- four"),
    ({"type": "bullets", "count": 2}, "• first\n  - second", "-not a bullet\n- only one"),
    ({"type": "numbered", "count": 3}, "1. a\n2) b\n3. c", "1. a\n2. b\n3. c\n4. d"),
    ({"type": "numbered", "count": 2}, "1. a\n2. b", "1. a"),
    ({"type": "numbered", "count": 1}, "Steps:\n1. Go.", "Step 1.5 is not a list item."),
    ({"type": "max_words", "value": 5}, "one two three four five", "one two three four five six"),
    ({"type": "max_words", "value": 3}, "- alpha - beta - gamma", "alpha beta gamma delta"),
    ({"type": "min_words", "value": 4}, "it is four words", "only three words"),
    ({"type": "starts_with", "value": "Yes"}, "  Yes, it is safe.", "yes, it is safe."),
    ({"type": "ends_with", "value": "You've got this."}, "Good luck. You've got this.  \n", "You've got this. Bye."),
    ({"type": "contains", "value": "translator"}, "A Translator of code.", "The translators are here."),
    ({"type": "contains", "value": "C++"}, "I like C++ a lot.", "I like C a lot."),
    ({"type": "excludes", "value": "amazing"}, "An amazingly good book.", "An Amazing book."),
    ({"type": "language", "value": "fr"},
     "Je me lève tôt, je bois un café et je lis le journal avant de partir au travail.",
     "I get up early, drink a coffee and read the paper before I leave for work."),
    ({"type": "language", "value": "de"},
     "Regelmäßige Bewegung stärkt das Herz und verbessert die Stimmung.",
     "Regular exercise strengthens the heart and improves your mood."),
    ({"type": "lowercase"}, "a bottle that keeps water cold all day.", "a bottle that keeps water cold all Day."),
    ({"type": "json"}, '{"city": "Tokyo", "country": "Japan"}', "{'city': 'Tokyo'}"),
    ({"type": "json"}, '```json\n["apple", "pear", "plum"]\n```', 'Here you go: ["apple", "pear", "plum"]'),
]


@pytest.mark.parametrize("constraint, met, violated", CASES, ids=[f"{c['type']}-{i}" for i, (c, _, _) in
                                                                  enumerate(CASES)])
def test_each_checker_on_met_and_violated_responses(constraint, met, violated):
    assert constraints.problems([constraint], "row") == []
    assert constraints.check(met, constraint) is True
    assert constraints.check(violated, constraint) is False


def test_every_type_has_a_met_and_a_violated_case():
    assert {case[0]["type"] for case in CASES} == set(constraints.TYPES)


def test_bad_constraints_are_all_reported_with_where():
    found = constraints.problems([{"type": "bulets", "count": 3}, {"type": "max_words"},
                                  {"type": "max_words", "value": True}, {"type": "language", "value": "french"},
                                  {"type": "lowercase", "value": 1}, {"type": "starts_with", "value": "  "}],
                                 "p.jsonl: prompt 'x'")
    assert len(found) == 6 and all(p.startswith("p.jsonl: prompt 'x': constraints[") for p in found)
    assert "unknown type 'bulets'" in found[0] and "language 'french'" in found[3]
    assert constraints.problems("bullets", "w") == ["w: constraints: expected a list of {type: ..., ...}"]
    # A type that is not a string (a list cannot even be looked up) is named like any unknown one.
    assert constraints.problems([{"type": ["bullets"], "count": 3}], "w") == [
        f"w: constraints[0]: unknown type ['bullets']; known: {', '.join(constraints.TYPES)}"]


def test_shipped_instruction_prompts_are_valid_and_cover_the_types():
    rows = read_jsonl(EXAMPLES / "instructions.jsonl")
    assert len(rows) >= 20 and len({r["id"] for r in rows}) == len(rows)
    assert all(constraints.problems(r["constraints"], r["id"]) == [] for r in rows)
    assert {c["type"] for r in rows for c in r["constraints"]} == set(constraints.TYPES)


# eval compare with scripted engines ---------------------------------------------------------------------------


def _compare(tmp_path, prompts, replies, *, judge=None, mapping=(), out="eval"):
    """eval compare with one scripted engine per model (replies: model -> {prompt id or SET/ID: text}) and a
    scripted judge; returns the summary, the output folder and the judge engine."""
    # The engine's key is "SET/PROMPT_ID/eval": a reply is looked up by "SET/PROMPT_ID", else by the prompt id.
    engines = {name: ScriptedEngine(reply=lambda prompt, key, r=reply: r.get(key.rsplit("/", 1)[0])
                                    or r[key.split("/")[-2]]) for name, reply in replies.items()}
    engines["judge"] = judge or ScriptedEngine()
    config = compare.EvalCompareConfig(prompts=[str(p) for p in prompts], out=str(tmp_path / out),
                                       models=[f"{n}={n}" for n in replies], judge="judge" if judge else None,
                                       engine="openai", base_url="http://unused", set_constitutions=list(mapping))
    with mock.patch.object(compare, "open_engine", lambda config, model: engines[model]):
        summary = compare.run(config)
    return summary, tmp_path / out, engines["judge"]


def _prompt(i, text="Say something."):
    return {"id": f"p{i}", "messages": [{"role": "user", "content": text}]}


def test_set_constitution_decides_the_judge_question_not_the_set_name(tmp_path):
    helpful_x = write_jsonl(tmp_path / "helpful-x.jsonl", [_prompt(i) for i in range(3)])
    anything = write_jsonl(tmp_path / "anything.jsonl", [_prompt(i) for i in range(3)])
    # Each response names its set, so every question the judge is asked can be traced to its set.
    replies = {m: {f"{s}/p{i}": f"{m} on {s}/p{i}" for s in ("helpful-x", "anything") for i in range(3)}
               for m in ("a", "b")}
    summary, out, judge = _compare(tmp_path, [helpful_x, anything], replies, judge=ScriptedEngine(),
                                   mapping=["anything=helpful"])
    harmless = {p.text for p in c.load("harmless").comparison}
    helpful = {p.text for p in c.load("helpful").comparison}
    asked = {"helpful-x": set(), "anything": set()}
    for method, texts, _ in judge.calls:
        for text in texts if method == "choice_logprobs" else []:
            principle, a, _ = question_parts(text)
            asked[a.split(" on ")[1].split("/")[0]].add(principle)
    assert asked["helpful-x"] and asked["helpful-x"] <= harmless  # the name says helpful; no mapping: harmless
    assert asked["anything"] and asked["anything"] <= helpful  # the name says nothing; mapped: helpful
    judgements = read_jsonl(out / "judgements.jsonl")
    assert len(judgements) == 6
    texts = {p.id: p.text for p in c.load("harmless").comparison + c.load("helpful").comparison}
    for j in judgements:
        assert j["constitution"] == ("helpful" if j["set"] == "anything" else "harmless")
        assert texts[j["principle"]] in asked[j["set"]]
    assert summary["set_constitutions"] == {"helpful-x": "harmless", "anything": "helpful"}
    assert json.loads((out / "summary.json").read_text())["set_constitutions"] == summary["set_constitutions"]
    meta = judgements[0]["meta"]["set_constitutions"]
    assert meta["anything"] == {"name": "helpful", "hash": c.load("helpful").content_hash()}
    assert "anything: `helpful`" in (out / "report.md").read_text()


def test_without_a_mapping_every_set_gets_the_harmless_question(tmp_path):
    helpful = write_jsonl(tmp_path / "helpful.jsonl", [_prompt(i) for i in range(2)])
    replies = {"a": {"p0": "x", "p1": "y"}, "b": {"p0": "z", "p1": "w"}}
    _, out, judge = _compare(tmp_path, [helpful], replies, judge=ScriptedEngine())
    harmless = {p.text for p in c.load("harmless").comparison}
    asked = {question_parts(t)[0] for m, texts, _ in judge.calls if m == "choice_logprobs" for t in texts}
    assert asked and asked <= harmless
    assert {j["constitution"] for j in read_jsonl(out / "judgements.jsonl")} == {"harmless"}


def test_a_bad_mapping_fails_before_any_model(tmp_path):
    prompts = write_jsonl(tmp_path / "set.jsonl", [_prompt(0)])
    for mapping, message in ((["nosuch=helpful"], "names set(s) 'nosuch' that no prompt file holds"),
                             (["set"], "write SET=CONSTITUTION"),
                             (["set=helpful", "set=harmless"], "mapped twice"),
                             (["set=no-such-constitution"], "no such constitution file")):
        with pytest.raises(UsageError, match=re.escape(message)):
            _compare(tmp_path, [prompts], {"a": {}}, judge=ScriptedEngine(), mapping=mapping)
    assert not (tmp_path / "eval" / "responses.jsonl").exists()


def test_compare_reports_the_share_of_constraints_met_per_model_and_set(tmp_path):
    rows = [{**_prompt(0), "constraints": [{"type": "bullets", "count": 2}, {"type": "max_words", "value": 4}]},
            {**_prompt(1), "constraints": [{"type": "starts_with", "value": "Yes"}]},
            {**_prompt(2), "constraints": [{"type": "lowercase"}, {"type": "json"},
                                           {"type": "contains", "value": "ok"}]}]
    instructions = write_jsonl(tmp_path / "instructions.jsonl", rows)
    plain = write_jsonl(tmp_path / "plain.jsonl", [_prompt(9)])
    replies = {
        # a: p0 both met, p1 met, p2 lowercase and json met, contains not: 5 of 6, 2 of 3 prompts all met.
        "a": {"p0": "- one\n- two", "p1": "Yes.", "p2": '{"a": "no"}', "p9": "hi"},
        # b: p0 bullets violated (3), words violated (5); p1 violated; p2 all met: 3 of 6, 1 of 3 prompts.
        "b": {"p0": "- one two\n- three four\n- five", "p1": "No.", "p2": '["ok"]', "p9": "hi"},
    }
    summary, out, _ = _compare(tmp_path, [instructions, plain], replies)
    stats = summary["per_model"]
    assert stats["instructions"]["a"]["constraints_met"] == pytest.approx(5 / 6, abs=1e-4)
    assert stats["instructions"]["a"]["prompts_all_met"] == pytest.approx(2 / 3, abs=1e-4)
    assert stats["instructions"]["b"]["constraints_met"] == 0.5
    assert stats["instructions"]["b"]["prompts_all_met"] == pytest.approx(1 / 3, abs=1e-4)
    assert stats["instructions"]["a"]["constraints_checked"] == 6
    assert stats["all"]["a"]["constraints_met"] == pytest.approx(5 / 6, abs=1e-4)  # the plain set adds none
    assert "constraints_met" not in stats["plain"]["a"]
    records = {(r["model"], r["prompt_id"]): r for r in read_jsonl(out / "records.jsonl")}
    assert [x["met"] for x in records[("b", "p0")]["constraints"]] == [False, False]
    assert records[("a", "p2")]["constraints"][2] == {"type": "contains", "value": "ok", "met": False}
    assert "constraints" not in records[("a", "p9")]
    report = (out / "report.md").read_text()
    assert "| model | constraints met | prompts, all met |" in report and "| a | 0.833 | 0.667 |" in report


def test_compare_refuses_bad_constraints_before_any_model(tmp_path):
    rows = [{**_prompt(0), "constraints": [{"type": "bulets", "count": 2}]}]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UsageError, match=r"bad.jsonl: prompt 'p0': constraints\[0\]: unknown type 'bulets'"):
        _compare(tmp_path, [bad], {"a": {"p0": "x"}})


def test_frontier_puts_each_model_at_its_helpful_and_harmless_elo(tmp_path):
    harmless_set = write_jsonl(tmp_path / "red.jsonl", [_prompt(i) for i in range(4)])
    helpful_set = write_jsonl(tmp_path / "asks.jsonl", [_prompt(i) for i in range(4)])
    helpful = {p.text for p in c.load("helpful").comparison}
    # This judge prefers b's responses under helpful principles and a's under harmless ones.
    judge = ScriptedEngine(p_a=lambda principle, a, b: 0.9 if (principle in helpful) == a.startswith("b ") else 0.1)
    replies = {m: {f"p{i}": f"{m} reply {i}" for i in range(4)} for m in ("a", "b")}
    summary, out, _ = _compare(tmp_path, [harmless_set, helpful_set], replies, judge=judge,
                               mapping=["asks=helpful"])
    frontier = summary["frontier"]
    assert frontier["source"] == "judge" and frontier["helpful"]["a"] == frontier["harmless"]["a"] == 0
    assert frontier["helpful"]["b"] > 0 > frontier["harmless"]["b"]
    assert summary["ratings"]["judge"]["asks"]["elo"]["b"]["elo"] == frontier["helpful"]["b"]
    assert (out / "frontier.png").stat().st_size > 1000
    assert "| b | +" in (out / "report.md").read_text()
    # Sets under one constitution only: no frontier.
    summary, out, _ = _compare(tmp_path, [harmless_set], replies, judge=ScriptedEngine(), out="one")
    assert summary["frontier"] is None and not (out / "frontier.png").exists()
