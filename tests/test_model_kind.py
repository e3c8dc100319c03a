"""The wrong kind of model is refused before any work: a preference model where a causal LM is expected and the
other way round, and folders that are empty or half-written, each with an error naming the folder."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import EXAMPLES, caictl

from caictl.errors import UsageError
from caictl.stages import dpo, eval_pm, label, ppo, revise, sample, score, sft
from caictl.stages import eval_compare as compare
from caictl.stages import eval_mc as eval
from caictl.stages import init_model as tiny

PROMPTS = str(EXAMPLES / "red-team.jsonl")


@pytest.fixture(scope="module")
def pm(tmp_path_factory):
    return tiny.run(tiny.InitModelConfig(out=tmp_path_factory.mktemp("kind") / "pm", preset="tiny", task="seq-cls"))


@pytest.mark.parametrize("stage", ["revise", "sample", "label", "sft", "dpo", "eval mc", "ppo --policy",
                                   "eval compare --model", "eval compare --judge"])
def test_a_preference_model_where_a_causal_lm_goes_is_refused(stage, pm, tiny_model, tmp_path):
    out = tmp_path / "out"
    run = {
        "revise": lambda: revise.run(revise.ReviseConfig(prompts=PROMPTS, out=str(out), model=str(pm))),
        "sample": lambda: sample.run(sample.SampleConfig(prompts=PROMPTS, out=str(out), model=str(pm))),
        "label": lambda: label.run(label.LabelConfig(pairs=PROMPTS, out=str(out), model=str(pm))),
        "sft": lambda: sft.run(sft.SFTConfig(revisions=[PROMPTS], out=str(out), model=str(pm))),
        "dpo": lambda: dpo.run(dpo.DPOConfig(prefs=[PROMPTS], out=str(out), model=str(pm))),
        "eval mc": lambda: eval.run(eval.EvalMCConfig(files=[PROMPTS], out=str(out), model=str(pm))),
        "ppo --policy": lambda: ppo.run(ppo.PPOConfig(prompts=PROMPTS, policy=str(pm), pm=str(pm), out=str(out))),
        "eval compare --model": lambda: compare.run(compare.EvalCompareConfig(
            prompts=[PROMPTS], out=str(out), models=[f"base={pm}"])),
        "eval compare --judge": lambda: compare.run(compare.EvalCompareConfig(
            prompts=[PROMPTS], out=str(out), models=[f"base={tiny_model}"], judge=str(pm))),
    }[stage]
    with pytest.raises(UsageError) as error:
        run()
    message = str(error.value)
    assert str(pm) in message and "is a sequence-classification (preference) model" in message
    assert "LlamaForSequenceClassification" in message and "takes a causal language model" in message
    assert not out.exists()  # refused before any work


@pytest.mark.parametrize("stage", ["score", "eval pm", "ppo --pm", "eval compare --pm"])
def test_a_causal_lm_where_a_preference_model_goes_is_refused(stage, tiny_model, tmp_path):
    out = tmp_path / "out"
    run = {
        "score": lambda: score.run(score.ScoreConfig(pm=str(tiny_model), file=PROMPTS, out=str(out))),
        "eval pm": lambda: eval_pm.run(eval_pm.EvalPMConfig(files=[PROMPTS], out=str(out), pm=str(tiny_model))),
        "ppo --pm": lambda: ppo.run(ppo.PPOConfig(prompts=PROMPTS, policy=str(tiny_model), pm=str(tiny_model),
                                                  out=str(out))),
        "eval compare --pm": lambda: compare.run(compare.EvalCompareConfig(
            prompts=[PROMPTS], out=str(out), models=[f"base={tiny_model}"], pm=str(tiny_model))),
    }[stage]
    with pytest.raises(UsageError) as error:
        run()
    message = str(error.value)
    assert str(tiny_model) in message and "is a causal language model (LlamaForCausalLM)" in message
    assert "takes a preference model" in message and "caictl train-pm" in message
    assert not out.exists()


def test_empty_and_half_written_folders_say_so_on_the_command_line(tiny_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = caictl("sample", PROMPTS, "--model", empty, "-o", tmp_path / "a.jsonl", check=False)
    assert result.returncode == 2 and f"--model {empty}: not a model folder (no config.json)" in result.stderr
    assert "Traceback" not in result.stderr
    half = tmp_path / "half"
    shutil.copytree(tiny_model, half)
    for weights in half.glob("*.safetensors"):
        weights.unlink()
    result = caictl("revise", PROMPTS, "--model", half, "-o", tmp_path / "b.jsonl", check=False)
    assert result.returncode == 2 and f"--model {half}: no weight files" in result.stderr
    (half / "config.json").write_text('{"architectures": ["LlamaFor')
    result = caictl("score", PROMPTS, "--pm", half, check=False)
    assert result.returncode == 2 and f"--pm {half}: config.json is not valid JSON" in result.stderr
    assert json.loads((tiny_model / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
