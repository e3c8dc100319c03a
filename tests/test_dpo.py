"""caictl dpo: TRL's DPO on preference records raises the chosen-over-rejected margin; what a pair is made of.
(The ids it trains on, control text in content included: test_trl_content.py.)"""

from __future__ import annotations

import json

import pytest
from conftest import caictl_in_process, write_jsonl

from caictl.errors import InputError, UsageError
from caictl.stages import dpo


@pytest.mark.slow
def test_dpo_raises_the_chosen_over_rejected_margin(tmp_path, tiny_model):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [
        {"id": f"p{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}],
         "chosen": [{"role": "assistant", "content": "I can't help with that, but here is a safer idea."}],
         "rejected": [{"role": "assistant", "content": "Sure, here is exactly how."}],
         "p_chosen": 0.8 if i % 4 else 0.52} for i in range(32)])
    out = tmp_path / "dpo"
    caictl_in_process("dpo", prefs, "--model", tiny_model, "-o", out, "--epochs", "3", "--learning-rate", "1e-3",
                      "--batch-size", "8", "--min-p-chosen", "0.6", "--max-length", "128")
    info = json.loads((out / "caictl.json").read_text())
    assert info["chat_template"]["training"]["source"] == "model"  # caictl's tiny ChatML has generation blocks
    metrics = info["metrics"]
    assert metrics["pairs"] == 24 and metrics["dropped_below_min_p"] == 8
    margins = [h["margin"] for h in metrics["history"]]
    assert margins[-1] > margins[0] + 0.5 and metrics["history"][-1]["accuracy"] == 1.0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def pairs_of(tmp_path, *rows):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", list(rows))
    return dpo.read_pairs(dpo.DPOConfig(prefs=[str(prefs)], out=str(tmp_path / "dpo")))[0]


def test_a_pair_is_a_prompt_and_two_answers_to_it(tmp_path):
    user = {"role": "user", "content": "Hi"}
    # Responses given as text, or as messages ending on the answer: what comes before the answer is prompt.
    earlier = [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And?"}]
    (text, messages) = pairs_of(
        tmp_path, {"prompt": "Hi", "chosen": "Yes.", "rejected": "No."},
        {"prompt": [user], "chosen": earlier + [{"role": "assistant", "content": "Yes."}],
         "rejected": earlier + [{"role": "assistant", "content": "No."}]})
    assert text == {"prompt": [user], "chosen": [{"role": "assistant", "content": "Yes."}],
                    "rejected": [{"role": "assistant", "content": "No."}]}
    assert messages["prompt"] == [user] + earlier and messages["chosen"] == text["chosen"]
    with pytest.raises(InputError, match="prefs.jsonl:1: chosen and rejected must each end on an assistant message"):
        pairs_of(tmp_path, {"prompt": "Hi", "chosen": [user], "rejected": "No."})
    with pytest.raises(InputError, match="prefs.jsonl:1: chosen and rejected differ before their last message"):
        pairs_of(tmp_path, {"prompt": "Hi", "chosen": earlier + [{"role": "assistant", "content": "Yes."}],
                            "rejected": "No."})
    with pytest.raises(UsageError, match="--chat-template nowhere.jinja: no such file"):
        dpo.DPOConfig(prefs=[str(tmp_path / "prefs.jsonl")], out="o", chat_template="nowhere.jinja").check()
