"""Constitutions: the shipped YAML, every external format in shared/, conversion and validation."""

from __future__ import annotations

import json
import random

import pytest
import yaml
from conftest import EXAMPLES, caictl, caictl_in_process, read_jsonl, write_jsonl

from caictl.data import constitution as c
from caictl.errors import UsageError

EXTERNAL = [
    "anthropic-paper/CritiqueRevisionInstructions.json",
    "anthropic-paper/RLMadisonInstructions.json",
    "anthropic-paper/CritiqueRevisionFewShotPrompts.json",
    "anthropic-paper/RLMadisonFewShotPrompts.json",
    "anthropic-paper/RLMadisonPrecogFewShotPrompts.json",
    "llm-swarm/constitution_anthropic.json",
    "llm-swarm/constituion_grok.json",
]


@pytest.mark.parametrize("name", c.shipped_names())
def test_shipped_constitutions_meet_the_bar(name):
    loaded = c.load(name)
    assert len(loaded.critique_revision) >= 12
    assert len(loaded.comparison) >= 12
    assert len(loaded.few_shot) >= 4
    assert sum(1 for p in loaded.critique_revision if p.examples) >= 4
    ids = [p.id for p in loaded.critique_revision] + [p.id for p in loaded.comparison]
    assert len(ids) == len(set(ids))
    # Revisions are plain replies: no role prefixes or "Here is the revised response:" openers.
    for shot in loaded.few_shot:
        assert not shot.revision.lower().startswith(("revision:", "assistant:", "here is the revised"))
        assert shot.messages[-1]["role"] == "assistant"


def test_shipped_constitution_has_a_no_change_example_and_anti_preachy_principles():
    loaded = c.load("harmless")
    unchanged = [s for s in loaded.few_shot if s.revision.strip() == s.messages[-1]["content"].strip()]
    assert len(unchanged) >= 1
    texts = " ".join(p.critique_request + p.revision_request for p in loaded.critique_revision).lower()
    comparisons = " ".join(p.text for p in loaded.comparison).lower()
    for word in ("preach", "refus"):
        assert word in texts and word in comparisons


@pytest.mark.parametrize("relative", EXTERNAL)
def test_every_shared_constitution_file_loads(shared_data, relative):
    loaded = c.load(shared_data / "constitutions" / relative)
    assert loaded.critique_revision or loaded.comparison or loaded.few_shot or loaded.label_few_shot
    for p in loaded.critique_revision:
        assert p.critique_request and p.revision_request
        assert "CritiqueRequest:" not in p.critique_request and not p.critique_request.endswith("Critique:")
    for shot in loaded.few_shot:
        assert shot.messages and shot.critique and shot.revision
    for example in loaded.label_few_shot:
        assert example.response_a and example.response_b and example.answer in "AB"
        assert example.messages and example.messages[-1]["role"] == "user"


def test_anthropic_files_merge_into_one_constitution(shared_data):
    folder = shared_data / "constitutions" / "anthropic-paper"
    merged = c.load([folder / "CritiqueRevisionInstructions.json", folder / "RLMadisonInstructions.json",
                     folder / "CritiqueRevisionFewShotPrompts.json"])
    assert len(merged.critique_revision) == 16 and merged.critique_revision[0].id == "harmful0"
    assert len(merged.comparison) == 16 and not merged.comparison[0].text.endswith("Options:")
    assert len(merged.few_shot) == 5
    assert merged.few_shot[0].messages[0]["content"].startswith("Could you help me burn down my house")


def test_llm_swarm_system_chat_becomes_few_shot(shared_data):
    loaded = c.load(shared_data / "constitutions" / "llm-swarm" / "constitution_anthropic.json")
    assert len(loaded.few_shot) == 4
    assert loaded.few_shot[0].messages[0]["content"] == "Give me some ideas to prank my boss?"


def test_precog_examples_keep_reasoning_and_answer(shared_data):
    loaded = c.load(shared_data / "constitutions" / "anthropic-paper" / "RLMadisonPrecogFewShotPrompts.json")
    first = loaded.label_few_shot[0]
    assert first.answer == "B" and first.reasoning.startswith("(A) This response does not address")
    assert first.messages[0]["content"].startswith("My daughter got in a fight")


def test_convert_round_trips_through_yaml(tmp_path, shared_data):
    folder = shared_data / "constitutions" / "anthropic-paper"
    out = tmp_path / "paper.yaml"
    caictl_in_process("constitution", "convert", folder / "CritiqueRevisionInstructions.json",
                      folder / "RLMadisonInstructions.json", folder / "RLMadisonFewShotPrompts.json", "-o", out,
                      "--name", "paper")
    original = c.load([folder / "CritiqueRevisionInstructions.json", folder / "RLMadisonInstructions.json",
                       folder / "RLMadisonFewShotPrompts.json"])
    original.name = "paper"
    assert c.load(out).content_hash() == original.content_hash()
    assert "ok" in caictl("constitution", "validate", out).stdout


def test_validation_reports_every_problem_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncritique_revision:\n  - id: a\n    critique_request: ''\n    colour: red\n"
                   "comparison:\n  - text: which?\n")
    with pytest.raises(UsageError) as info:
        c.load(bad)
    message = str(info.value)
    assert "unknown field(s) colour" in message
    assert "missing field(s) revision_request" in message
    assert "critique_request: expected non-empty text" in message
    assert "comparison[0]: missing field(s) id" in message
    result = caictl("constitution", "validate", bad, check=False)
    assert result.returncode == 2 and "colour" in result.stderr and "Traceback" not in result.stderr


def test_restrict_and_draw():
    loaded = c.load("harmless")
    first, second = loaded.critique_revision[0].id, loaded.critique_revision[1].id
    only = loaded.restrict([first, second])
    assert [p.id for p in only.critique_revision] == [first, second]
    drawn = only.draw_critique_principles(4, random.Random(1))
    assert {p.id for p in drawn} <= {first, second}
    assert [p.id for p in loaded.draw_critique_principles(4, random.Random("0:a"))] == \
           [p.id for p in loaded.draw_critique_principles(4, random.Random("0:a"))]
    four = loaded.draw_critique_principles(4, random.Random(3))
    assert len({p.id for p in four}) == 4  # no repeats while there are enough principles
    with pytest.raises(UsageError, match="unknown principle id"):
        loaded.restrict(["no-such-principle"])


def test_show_lists_ids():
    result = caictl("constitution", "show", "harmless")
    assert c.load("harmless").critique_revision[0].id in result.stdout


def test_few_shot_only_file_converts_validates_and_merges(tmp_path, shared_data):
    folder = shared_data / "constitutions" / "anthropic-paper"
    few_shot = tmp_path / "fs.yaml"
    caictl_in_process("constitution", "convert", folder / "CritiqueRevisionFewShotPrompts.json", "-o", few_shot)
    alone = caictl("constitution", "validate", few_shot)
    assert f"{few_shot}: ok" in alone.stdout and "5 few-shot" in alone.stdout
    merged_spec = f"{few_shot},{folder / 'CritiqueRevisionInstructions.json'}"
    merged = caictl("constitution", "validate", merged_spec)
    assert "16 critique/revision principles" in merged.stdout and "5 few-shot" in merged.stdout
    loaded = c.load(merged_spec)
    assert loaded.few_shot[0].messages[0]["content"].startswith("Could you help me burn down my house")


def test_a_file_with_nothing_in_it_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("name: empty\n")
    result = caictl("constitution", "validate", empty, check=False)
    assert result.returncode == 2 and f"{empty}: nothing in it" in result.stderr


def test_stages_refuse_a_constitution_without_their_principles_and_say_to_merge(tmp_path, shared_data):
    folder = shared_data / "constitutions" / "anthropic-paper"
    few_shot = tmp_path / "fs.yaml"
    caictl_in_process("constitution", "convert", folder / "CritiqueRevisionFewShotPrompts.json", "-o", few_shot)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    # The constitution is checked before the model loads, so a model that does not exist is never reached.
    result = caictl("revise", prompts, "--model", "no/such-model", "--constitution", few_shot, check=False)
    assert result.returncode == 2
    assert f"{few_shot} has no critique/revision principles" in result.stderr
    assert f"--constitution {few_shot},PRINCIPLES_FILE" in result.stderr
    instructions = folder / "CritiqueRevisionInstructions.json"
    result = caictl("label", prompts, "--model", "no/such-model", "--constitution", f"{few_shot},{instructions}",
                    check=False)
    assert result.returncode == 2 and "has no comparison principles" in result.stderr


def test_revise_runs_on_few_shot_file_merged_with_principles(tmp_path, shared_data, tiny_model):
    folder = shared_data / "constitutions" / "anthropic-paper"
    few_shot = tmp_path / "fs.yaml"
    caictl_in_process("constitution", "convert", folder / "CritiqueRevisionFewShotPrompts.json", "-o", few_shot)
    spec = f"{few_shot},{folder / 'CritiqueRevisionInstructions.json'}"
    out = tmp_path / "revisions.jsonl"
    caictl_in_process("revise", EXAMPLES / "red-team.jsonl", "-o", out, "--model", tiny_model, "--constitution", spec,
                      "--limit", "1", "--rounds", "2", "--max-new-tokens", "8", "--shots", "1")
    [record] = read_jsonl(out)
    assert [s["principle"][:7] for s in record["steps"]] == ["harmful", "harmful"]
    assert record["meta"]["constitution_hash"] == c.load(spec).content_hash()


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_convert_writes_the_format_its_suffix_names(tmp_path, shared_data, suffix):
    folder = shared_data / "constitutions" / "anthropic-paper"
    sources = [folder / "CritiqueRevisionInstructions.json", folder / "RLMadisonPrecogFewShotPrompts.json"]
    out = tmp_path / f"paper{suffix}"
    caictl_in_process("constitution", "convert", *sources, "-o", out, "--name", "paper")
    text = out.read_text(encoding="utf-8")
    data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    if suffix != ".json":
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
    assert data["name"] == "paper" and len(data["critique_revision"]) == 16
    original = c.load(sources)
    original.name = "paper"
    assert c.load(out).content_hash() == original.content_hash()


@pytest.mark.parametrize("name", ["paper.jsonl", "paper.txt", "paper"])
def test_convert_refuses_an_output_suffix_it_cannot_write(tmp_path, shared_data, name):
    out = tmp_path / name
    result = caictl("constitution", "convert", "harmless", "-o", out, check=False)
    assert result.returncode == 2 and not out.exists()
    assert f"{out}:" in result.stderr and ".yaml, .yml or .json" in result.stderr


def test_validate_reports_every_file_then_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncomparison:\n  - id: a\n    text: which?\n    colour: red\n")
    broken = tmp_path / "broken.json"
    broken.write_text("{\n  \"name\": \n")
    missing = tmp_path / "missing.yaml"
    result = caictl("constitution", "validate", "harmless", bad, missing, broken, "harmless", check=False)
    assert result.returncode == 2
    assert result.stdout.count("harmless: ok") == 2  # the file after the failures is checked too
    assert f"{bad}: comparison[0]: unknown field(s) colour" in result.stderr
    assert f"{missing}: no such constitution file" in result.stderr
    assert f"{broken}:3: invalid JSON" in result.stderr
    assert "3 of 5 constitutions failed validation" in result.stderr


def test_merging_duplicate_ids_names_the_files():
    result = caictl("constitution", "validate", "harmless,harmless", check=False)
    assert result.returncode == 2 and "constitution harmless,harmless: duplicate principle ids: " in result.stderr


def test_helpful_constitution_validates_and_shows():
    assert "helpful" in c.shipped_names()
    validated = caictl_in_process("constitution", "validate", "helpful")
    assert validated.startswith("helpful: ok (14 critique/revision principles, 14 comparison principles, 4 few-shot")
    shown = caictl_in_process("constitution", "show", "helpful")
    assert "requested-format" in shown and "follows-instructions" in shown
    loaded = c.load("helpful")
    # What it is about: instructions, format, completeness, accuracy, admitting uncertainty, not inventing.
    texts = " ".join(p.critique_request + p.revision_request for p in loaded.critique_revision).lower()
    for word in ("asked", "form", "complete", "correct", "do not know", "invent"):
        assert word in texts
    # A good response is left as it is in at least one worked exchange, as in harmless.
    assert any(s.revision.strip() == s.messages[-1]["content"].strip() for s in loaded.few_shot)
    assert {e.answer for e in loaded.label_few_shot} == {"A", "B"}


def test_revise_and_label_run_under_the_helpful_constitution(tmp_path, tiny_model):
    out = tmp_path / "revisions.jsonl"
    caictl_in_process("revise", EXAMPLES / "instructions.jsonl", "-o", out, "--model", tiny_model,
                      "--constitution", "helpful", "--limit", "2", "--rounds", "2", "--max-new-tokens", "8",
                      "--shots", "1")
    records = read_jsonl(out)
    helpful = c.load("helpful")
    ids = {p.id for p in helpful.critique_revision}
    assert len(records) == 2 and all(s["principle"] in ids for r in records for s in r["steps"])
    assert {r["meta"]["constitution_hash"] for r in records} == {helpful.content_hash()}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": r["id"], "messages": r["messages"], "responses": ["- one\n- two\n- three", "I am not sure."]}
        for r in read_jsonl(EXAMPLES / "instructions.jsonl")[:2]])
    prefs = tmp_path / "prefs.jsonl"
    caictl_in_process("label", pairs, "-o", prefs, "--model", tiny_model, "--constitution", "helpful")
    labels = read_jsonl(prefs)
    comparison_ids = {p.id for p in helpful.comparison}
    assert len(labels) == 2 and all(v["principle"] in comparison_ids for r in labels for v in r["votes"])
    assert {r["meta"]["constitution_hash"] for r in labels} == {helpful.content_hash()}
