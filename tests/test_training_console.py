"""The training stages' plumbing: ppo's options checked before any model loads, caictl's own progress in place of
TRL's tqdm bars, figures printed to 4 significant digits, and the one caictl.json writer."""

from __future__ import annotations

import json
import re

import pytest
from conftest import EXAMPLES, caictl, write_jsonl

from caictl import __version__, ui
from caictl.data.reading import file_hash
from caictl.errors import UsageError
from caictl.models.training import write_model_info
from caictl.stages import ppo


def test_ppo_only_options_are_refused_by_name_under_rloo_and_grpo(tmp_path):
    # Folders that are no models: the refusal must come before any model is looked at, let alone loaded.
    refused = caictl("ppo", EXAMPLES / "red-team.jsonl", "--policy", tmp_path, "--pm", tmp_path, "-o", tmp_path / "o",
                     "--algo", "grpo", "--gamma", "0.9", "--lam", "0.9", "--no-whiten-advantages", "--batch-size", "8",
                     check=False)
    assert refused.returncode == 2
    assert "--gamma, --lam, --no-whiten-advantages only apply to --algo ppo" in refused.stderr
    one = caictl("ppo", EXAMPLES / "red-team.jsonl", "--policy", tmp_path, "--pm", tmp_path, "-o", tmp_path / "o",
                 "--algo", "rloo", "--clip-range", "0.1", "--batch-size", "8", check=False)
    assert one.returncode == 2 and "--clip-range only applies to --algo ppo" in one.stderr
    # Their defaults, written out, change nothing and pass; so does any value under --algo ppo.
    ppo.PPOConfig(prompts=None, policy=str(tmp_path), pm=str(tmp_path), out="o", algo="grpo", batch_size=8,
                  gamma=1.0, lam=0.95).check()
    ppo.PPOConfig(prompts=None, policy=str(tmp_path), pm=str(tmp_path), out="o", gamma=0.9, lam=0.9).check()


def test_ppo_without_a_pm_says_how_to_give_one(tmp_path):
    refused = caictl("ppo", EXAMPLES / "red-team.jsonl", "--policy", tmp_path, "-o", tmp_path / "o", check=False)
    assert refused.returncode == 2
    assert ("--reward pm needs --pm FOLDER (caictl train-pm output), or use --reward judge --judge MODEL"
            in refused.stderr)
    assert "--pm None" not in refused.stderr
    with pytest.raises(UsageError, match="--pm /nowhere: no such folder"):
        ppo.PPOConfig(prompts=None, policy=str(tmp_path), pm="/nowhere", out="o").check()


def test_summary_figures_have_4_significant_digits(capsys):
    ui.summary_table("t", [("loss", 11.926162719726562), ("steps", 12), ("before -> after", (0.123456, 2.0)),
                           ("seconds", 12345.678), ("rate", 1e-05), ("none", None), ("flag", True),
                           ("whole", 0.0)])
    printed = capsys.readouterr().err
    cells = dict(re.findall(r"│\s*(.+?)\s*│\s*(.+?)\s*│", printed) or re.findall(r"^\s*(\S.*?)  +(\S.*?)\s*$", printed,
                                                                                re.M))
    assert cells["loss"] == "11.93" and cells["steps"] == "12" and cells["before -> after"] == "0.1235 -> 2.0"
    assert cells["seconds"] == "12346" and cells["rate"] == "1e-05" and cells["none"] == "None"
    assert cells["flag"] == "True" and cells["whole"] == "0.0"  # as the summary dict's str() writes it


def test_caictl_json_is_written_in_one_shape(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p"}])
    info = write_model_info(tmp_path, "sft", {"base_model": "m"}, inputs=[data], options=ppo.PPOConfig(
        prompts=None, policy="p", pm=None, out="o"), extra={"chat_template": {"x": 1}}, metrics={"loss": 0.123456789})
    assert json.loads((tmp_path / "caictl.json").read_text()) == info
    assert list(info) == ["stage", "caictl_version", "world_size", "base_model", "inputs", "options",
                          "chat_template", "metrics"]
    assert info["caictl_version"] == __version__ and info["world_size"] == 1
    assert info["inputs"] == [{"path": str(data), "sha256": file_hash(data)}]
    assert info["options"]["lam"] == 0.95 and info["metrics"] == {"loss": 0.123456789}  # every digit kept
    bare = write_model_info(tmp_path, "init-model", {"random_weights": True}, processes=False)
    assert list(bare) == ["stage", "caictl_version", "random_weights"]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": "An answer."}]} for i in range(4)]
    return write_jsonl(tmp_path_factory.mktemp("console") / "chats.jsonl", rows)


SFT_FAST = ["--max-steps", "2", "--batch-size", "2", "--max-length", "64"]
TQDM = re.compile(r"it/s\]|s/it\]|%\|")


def test_sft_shows_caictls_progress_and_no_tqdm_bar(tmp_path, tiny_model, sft_data):
    run = caictl("sft", sft_data, "-o", tmp_path / "out", "--model", tiny_model, *SFT_FAST)
    assert not TQDM.search(run.stderr), run.stderr
    final = re.search(r"sft: 2 steps in [\d.]+s \([\d.]+ steps/s\), loss (\S+) -> (\S+)", run.stderr)
    assert final, run.stderr
    metrics = json.loads((tmp_path / "out" / "caictl.json").read_text())["metrics"]
    first, last = metrics["train_loss_first"], metrics["train_loss_last"]
    # The console rounds; caictl.json keeps every digit.
    assert final.groups() == (ui.figure(first), ui.figure(last))
    assert f"{ui.figure(first)} -> {ui.figure(last)}" in run.stderr and str(first) not in run.stderr


def test_sft_under_verbose_shows_the_trainers_own_bars(tmp_path, tiny_model, sft_data):
    run = caictl("-v", "sft", sft_data, "-o", tmp_path / "out", "--model", tiny_model, *SFT_FAST)
    # The trainer's own bar over the 2 steps, not only the bars of loading and dataset preparation.
    assert re.search(r"\| 2/2 \[[^\]]*(it/s|s/it)\]", run.stderr), run.stderr
    assert not re.search(r"sft: 2 steps in", run.stderr)
