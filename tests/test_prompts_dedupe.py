"""prompts dedupe: exact and near duplicates within a file, decontamination against evaluation prompts, and the
default threshold measured on labelled pairs built from hh-rlhf's first human turns."""

from __future__ import annotations

import gzip
import json
import math
import re

import pytest
from conftest import EXAMPLES, caictl, caictl_in_process, read_jsonl, write_jsonl

from caictl.data.conversation import parse_transcript
from caictl.data.dedupe import DEFAULT_SHINGLE_SIZE, DEFAULT_THRESHOLD, NearIndex, jaccard, normalised, shingles


def first_human_turns(shared_data) -> list[str]:
    path = shared_data / "hh-rlhf" / "harmless-base-test.part-a.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as stream:
        rows = [json.loads(line) for line in stream]
    return [next(m["content"] for m in parse_transcript(r["chosen"]) if m["role"] == "user") for r in rows]


# Paraphrases made by rule, never by hand, so the set is the same on every machine and nothing is copied in.
def reorder(text: str) -> str:
    words = text.split()
    return " ".join(words[len(words) // 2:] + words[:len(words) // 2])


def repunctuate(text: str) -> str:
    return re.sub(r"[^\w\s']", "", text).strip() + "?!"


def replace_one_word(text: str) -> str:
    words = text.split()
    longest = max(range(len(words)), key=lambda i: len(words[i]))
    return " ".join(words[:longest] + ["something"] + words[longest + 1:])


RULES = (reorder, repunctuate, replace_one_word, lambda text: replace_one_word(repunctuate(reorder(text))))


def labelled_pairs(shared_data) -> list[tuple[str, str, bool]]:
    """80 paraphrases (each rule and all three at once) and 80 distinct pairs that open with the same two words,
    the hardest kind of negative a simple rule finds (hh-rlhf has many "How do I ..." prompts)."""
    pool, seen = [], set()
    for text in first_human_turns(shared_data):
        key = normalised(text)
        if key not in seen and 5 <= len(key.split()) <= 40:
            seen.add(key)
            pool.append(text.strip())
    positives = [(pool[i], RULES[i % len(RULES)](pool[i]), True) for i in range(80)]
    negatives, used, rest = [], set(), pool[80:]
    for i, text in enumerate(rest):
        opening = normalised(text).split()[:2]
        partner = next((j for j in range(i + 1, len(rest)) if j not in used and i not in used
                        and normalised(rest[j]).split()[:2] == opening), None)
        if partner is not None:
            negatives.append((text, rest[partner], False))
            used |= {i, partner}
        if len(negatives) == 80:
            break
    return positives + negatives


def test_the_default_threshold_finds_paraphrases_and_keeps_distinct_prompts_apart(shared_data):
    pairs = labelled_pairs(shared_data)
    assert len(pairs) >= 100 and sum(p[2] for p in pairs) == 80
    # The pairs through the real index (MinHash LSH, then exact Jaccard), one pair at a time.
    found = []
    for a, b, _ in pairs:
        index = NearIndex(DEFAULT_THRESHOLD, DEFAULT_SHINGLE_SIZE)
        first, second = index.signatures([a, b])
        index.add("a", first)
        found.append(index.match(second) is not None)
    true_positives = sum(f and label for f, (_, _, label) in zip(found, pairs))
    precision = true_positives / max(sum(found), 1)
    recall = true_positives / sum(label for _, _, label in pairs)
    print(f"labelled pairs: {len(pairs)}, precision {precision:.3f}, recall {recall:.3f}")
    assert precision == 1.0 and recall == 1.0

    # The default is the rule the help states: halfway between the closest distinct pair and the least similar
    # paraphrase, rounded down to 0.05; at a longer shingle the paraphrases and the distinct pairs overlap.
    def similarities(size):
        scores = [(jaccard(shingles(a, size), shingles(b, size)), label) for a, b, label in pairs]
        return min(s for s, label in scores if label), max(s for s, label in scores if not label)

    lowest_paraphrase, closest_distinct = similarities(DEFAULT_SHINGLE_SIZE)
    assert closest_distinct < lowest_paraphrase
    assert DEFAULT_THRESHOLD == math.floor((lowest_paraphrase + closest_distinct) / 2 * 20) / 20
    assert all(lowest < closest for lowest, closest in map(similarities, (2, 3)))


def test_hh_rlhf_first_turns_exact_and_near_rates_with_no_pair_left_over(shared_data, tmp_path):
    texts = first_human_turns(shared_data)
    prompts = write_jsonl(tmp_path / "hh.jsonl", [{"id": f"hh-{i}", "messages": [{"role": "user", "content": t}]}
                                                  for i, t in enumerate(texts)])
    caictl_in_process("prompts", "dedupe", prompts, "-o", tmp_path / "out.jsonl", "--dropped", tmp_path / "d.jsonl")
    kept, dropped = read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "d.jsonl")
    exact = [d for d in dropped if d["dropped"] == "exact"]
    near = [d for d in dropped if d["dropped"] == "near"]
    print(f"hh-rlhf first turns: {len(texts)}, exact {len(exact) / len(texts):.2%}, near {len(near) / len(texts):.2%}")
    assert len(exact) == len(texts) - len({normalised(t) for t in texts})
    assert len(kept) + len(dropped) == len(texts) and near
    by_id = {r["id"]: r["messages"][0]["content"] for r in kept}
    for row in near:  # each drop is true: its similarity is the exact one, at or above the threshold
        mine = shingles(row["row"]["messages"][0]["content"], DEFAULT_SHINGLE_SIZE)
        assert row["similarity"] == round(jaccard(mine, shingles(by_id[row["matched_id"]], 1)), 4) >= 0.6
    # And hardly a near duplicate is left: LSH makes a pair at the threshold a candidate 98% of the time, so of
    # the kept pairs compared exactly, at most 2 for every 100 near drops may still reach it (1 here, at 0.6).
    sets = [shingles(t, DEFAULT_SHINGLE_SIZE) for t in by_id.values()]
    left = [(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets))
            if len(sets[i] & sets[j]) >= DEFAULT_THRESHOLD * len(sets[i] | sets[j])]
    print(f"near pairs left among the kept rows: {len(left)}")
    assert len(left) <= 0.02 * len(near)


def test_decontamination_catches_the_example_files_leaks(tmp_path):
    held_out = [EXAMPLES / "held-out" / "harmless.jsonl", EXAMPLES / "held-out" / "helpful.jsonl"]
    against = [arg for path in held_out for arg in ("--against", path)]
    caictl_in_process("prompts", "dedupe", EXAMPLES / "helpful.jsonl", *against, "-o", tmp_path / "helpful.jsonl",
                      "--dropped", tmp_path / "helpful.dropped.jsonl")
    dropped = {d["id"]: d for d in read_jsonl(tmp_path / "helpful.dropped.jsonl")}
    assert dropped["hp-022"] | {"row": None} == {"id": "hp-022", "dropped": "contaminated", "matched_id": "ho-p-002",
                                                 "similarity": 1.0, "row": None}
    # rt-007 changes more than one word of ho-h-001: below the default, caught at the pipeline's 0.5.
    result = caictl("prompts", "dedupe", EXAMPLES / "red-team.jsonl", *against, "--threshold", "0.5",
                    "--dropped", tmp_path / "red-team.dropped.jsonl")
    kept = [json.loads(line)["id"] for line in result.stdout.splitlines()]
    assert len(kept) == 49 and "rt-007" not in kept
    (drop,) = read_jsonl(tmp_path / "red-team.dropped.jsonl")
    assert (drop["id"], drop["matched_id"], drop["similarity"]) == ("rt-007", "ho-h-001", 0.5625)
    assert "dropped contaminated" in result.stderr and "threshold" in result.stderr


def test_a_prompt_without_words_is_matched_by_its_exact_text(tmp_path):
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"id": "e", "prompt": "🙂🙂 ?"}])
    rows = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "🙂🙂 ?"}, {"id": "b", "prompt": "🙂"},
                                               {"id": "c", "prompt": "🙂"}])
    caictl_in_process("prompts", "dedupe", rows, "--against", held_out, "-o", tmp_path / "out.jsonl",
                      "--dropped", tmp_path / "dropped.jsonl")
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["b"]
    assert [(d["id"], d["dropped"], d["matched_id"]) for d in read_jsonl(tmp_path / "dropped.jsonl")] == [
        ("a", "contaminated", "e"), ("c", "exact", "b")]


def test_a_multi_turn_row_is_its_user_turns_joined_and_rows_pass_through_as_read(tmp_path):
    rows = [
        {"id": "a", "messages": [{"role": "user", "content": "Tell me a joke my grandmother would enjoy at dinner."},
                                 {"role": "assistant", "content": "No."},
                                 {"role": "user", "content": "Please, a short one about cats."}], "extra": 1},
        # The same user turns, another assistant turn: the same prompt.
        {"id": "b", "messages": [{"role": "user", "content": "tell me a JOKE my grandmother would enjoy at dinner"},
                                 {"role": "assistant", "content": "Sure, which kind?"},
                                 {"role": "user", "content": "Please: a short one, about cats!"}]},
        # Only the last turn alike: another prompt (Jaccard 6/15).
        {"id": "c", "messages": [{"role": "user", "content": "Please, a short one about cats."}]},
    ]
    out = caictl_in_process("prompts", "dedupe", write_jsonl(tmp_path / "in.jsonl", rows))
    assert [json.loads(line) for line in out.splitlines()] == [rows[0], rows[2]]


def test_bad_rows_and_options_are_usage_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "messages": [{"role": "user", "content": "hi"}]}\n{"id": "b"}\n')
    result = caictl("prompts", "dedupe", bad, check=False)
    assert result.returncode == 2 and f"{bad}:2: no prompt field" in result.stderr
    result = caictl("prompts", "dedupe", bad, "--threshold", "1.5", check=False)
    assert result.returncode == 2 and "--threshold must be in (0, 1]" in result.stderr


@pytest.mark.parametrize("threshold", [0.3, 1.0])
def test_the_threshold_is_the_one_given(tmp_path, threshold):
    rows = [{"id": "a", "prompt": "how do I pick a lock on a door"},
            {"id": "b", "prompt": "how do I open a lock without a key"}]  # Jaccard 5/11 = 0.45
    out = caictl_in_process("prompts", "dedupe", write_jsonl(tmp_path / "in.jsonl", rows), "--threshold", threshold)
    assert len(out.splitlines()) == (1 if threshold == 0.3 else 2)
