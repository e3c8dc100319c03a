"""Constitutions: the shipped YAML, every external format in shared/, conversion and validation."""

from __future__ import annotations

import random

import pytest
from conftest import caictl

from caictl import constitution as c
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
    caictl("constitution", "convert", folder / "CritiqueRevisionInstructions.json",
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
