"""caictl dpo: TRL's DPO on preference records raises the chosen-over-rejected margin."""

from __future__ import annotations

import json

import pytest
from conftest import caictl_in_process, write_jsonl


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
    metrics = json.loads((out / "caictl.json").read_text())["metrics"]
    assert metrics["pairs"] == 24 and metrics["dropped_below_min_p"] == 8
    margins = [h["margin"] for h in metrics["history"]]
    assert margins[-1] > margins[0] + 0.5 and metrics["history"][-1]["accuracy"] == 1.0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
