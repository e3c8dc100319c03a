"""A model value that names no folder here: a path stops at once with "no such folder" and no request to the hub; a
hub id stops after one attempt when it is neither cached nor reachable; a cached hub id passes offline. And the
one warning a random-weight folder gets per process."""

from __future__ import annotations

import socket
import time

import pytest
from conftest import EXAMPLES, caictl, caictl_in_process

from caictl.errors import UsageError
from caictl.models import kind
from caictl.stages import revise, score

PROMPTS = str(EXAMPLES / "red-team.jsonl")


@pytest.fixture
def hub_requests(monkeypatch, tmp_path):
    """Every name lookup the process makes (the hub is a name first), each refused as on a machine without
    network; an empty hub cache; HF_HUB_OFFLINE unset."""
    from huggingface_hub import constants

    attempts = []

    def refuse(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return attempts


@pytest.mark.parametrize("value", ["./models/qwen_tiny", "models/qwen/tiny", "~/no-such-model", "/no/such/model",
                                   "models/tiny/"])
def test_a_path_that_is_no_folder_stops_before_any_request(value, hub_requests, tmp_path):
    with pytest.raises(UsageError) as error:
        revise.run(revise.ReviseConfig(prompts=PROMPTS, out=str(tmp_path / "out.jsonl"), model=value))
    assert str(error.value).startswith(f"--model {value}: no such folder; build one with `caictl init-model")
    assert "or give a hub id" in str(error.value)
    with pytest.raises(UsageError) as error:
        score.run(score.ScoreConfig(pm=value, file=PROMPTS, out=str(tmp_path / "scores.jsonl")))
    assert str(error.value).startswith(f"--pm {value}: no such folder; build one with `caictl train-pm")
    assert hub_requests == []
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("stage", ["revise --model", "score --pm"])
def test_an_uncached_hub_id_stops_after_one_attempt(stage, hub_requests, tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # models/qwen_tiny: not a folder here, and a valid hub id
    run = {
        "revise --model": lambda: revise.run(revise.ReviseConfig(prompts=PROMPTS, out="out.jsonl",
                                                                 model="models/qwen_tiny")),
        "score --pm": lambda: score.run(score.ScoreConfig(pm="models/qwen_tiny", file=PROMPTS, out="out.jsonl")),
    }[stage]
    with pytest.raises(UsageError) as error:
        run()
    assert str(error.value).startswith(f"{stage.split()[1]} models/qwen_tiny: not a local folder (models/ holds "
                                       "tiny), not in the hub cache, and the hub could not be reached (")
    assert hub_requests == ["huggingface.co"]  # one attempt, not the loader's five with back-off
    assert not (tmp_path / "out.jsonl").exists()


def test_a_cached_hub_id_passes_without_a_request(hub_requests):
    from huggingface_hub import constants

    snapshot = f"{constants.HF_HUB_CACHE}/models--someone--cached-model"
    (kind.Path(snapshot) / "snapshots" / "abc").mkdir(parents=True)
    (kind.Path(snapshot) / "snapshots" / "abc" / "config.json").write_text("{}")
    (kind.Path(snapshot) / "refs").mkdir()
    (kind.Path(snapshot) / "refs" / "main").write_text("abc")
    kind.check("someone/cached-model", kind.CAUSAL_LM, "--model")
    assert hub_requests == []


@pytest.mark.parametrize("command", ["revise", "score"])
def test_the_command_line_names_the_missing_folder_at_once(command, tmp_path):
    missing = tmp_path / "models" / "qwen_tiny"
    flag = "--pm" if command == "score" else "--model"
    args = [PROMPTS, flag, missing] + (["-o", tmp_path / "out.jsonl"] if command == "revise" else [])
    start = time.perf_counter()
    result = caictl(command, *args, check=False, env={"HF_HUB_OFFLINE": "0"})
    assert time.perf_counter() - start < 20  # the hub loader's retries took 50 s
    assert result.returncode == 2, result.stderr
    assert f"caictl: error: {flag} {missing}: no such folder;" in result.stderr
    assert "Retrying" not in result.stderr and "Traceback" not in result.stderr


def test_random_weights_reads_init_model_s_mark(tiny_model, tmp_path):
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "caictl.json").write_text('{"stage": "sft"}')
    assert kind.random_weights(tiny_model)
    assert not kind.random_weights(trained) and not kind.random_weights(tmp_path / "missing")
    assert not kind.random_weights("Qwen/Qwen2.5-0.5B-Instruct")


def test_a_random_weight_model_is_named_once_per_process(tiny_model, tmp_path, capsys):
    kind._warned_random.clear()  # another test of this process may have used the model already
    caictl_in_process("revise", PROMPTS, "--model", tiny_model, "-o", tmp_path / "out.jsonl", "--limit", 1,
                      "--rounds", 1, "--max-new-tokens", 2, "--no-few-shot")
    kind.check(tiny_model, kind.CAUSAL_LM, "--judge")  # the same folder again, as ppo's --policy and --judge
    kind.require(f"{tiny_model}/", "--reference")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "RANDOM weights" in line]
    assert warnings == [f"warning: {tiny_model} has RANDOM weights (caictl init-model): what it generates or "
                        "scores is noise"]
