"""Training stages as two CPU processes (torchrun, accelerate launch): the run completes, only the main process
writes, and the loss history is the one-process run's with the same global batch. Plus the shipped accelerate
configs, and what must be refused under several processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import EXAMPLES, write_jsonl

from caictl.errors import UsageError
from caictl.models.pm import Scorer
from caictl.stages import dpo, ppo, sft, train_pm

CONFIGS = EXAMPLES / "accelerate"
ANSWERS = ["I can't help with hurting anyone, but if you're in danger, call emergency services.",
           "Lock picking is legal on locks you own; a practice lock is a good start.",
           "Please don't mix bleach and ammonia: the fumes are toxic."]

# Float32 sums taken in another order (each process sums its share, gloo adds the shares) differ in the last bits,
# and a few Adam steps carry that on: measured here within 2e-7 relative. 1e-5 leaves room for that and is far
# below what a wrong split does (another batch per step, or a gradient scaled by the process count: 1e-2 and up).
SAME_LOSS = dict(rel=1e-5, abs=1e-6)


# Loaded by every process of a launched run (a sitecustomize module on PYTHONPATH is imported at start-up): a Python
# audit hook that notes each path under WATCH_WRITES the process opens for writing, creates, renames or removes,
# one line each in WATCH_WRITES.writes-rank<RANK>. At exit it notes in WATCH_WRITES.exit-rank<RANK> whether the
# process still held its process group (gloo's threads then outlive the interpreter and can abort the process).
WATCH = r"""
import atexit, os, sys
watched = os.environ.get("WATCH_WRITES")
if watched and "RANK" in os.environ:
    report = os.open(f"{watched}.writes-rank{os.environ['RANK']}", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    exit_report = os.open(f"{watched}.exit-rank{os.environ['RANK']}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def at_exit():
        distributed = sys.modules.get("torch.distributed")
        held = distributed is not None and distributed.is_initialized()
        os.write(exit_report, b"group held" if held else b"group left")

    atexit.register(at_exit)  # registered first, so it runs after every other exit handler

    def hook(event, args):
        if event not in ("open", "os.mkdir", "os.remove", "os.rename", "shutil.rmtree"):
            return
        if event == "open" and not (set(args[1] or "") & set("wax+") or (args[2] or 0) & writing):
            return
        if isinstance(args[0], (str, os.PathLike)) and os.path.abspath(args[0]).startswith(watched):
            os.write(report, (os.path.relpath(args[0], watched) + "\n").encode())

    sys.addaudithook(hook)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_processes(*args, out: Path, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """caictl ARGS -o OUT as two CPU processes, each noting what it writes under OUT; fails the test with the
    output when the run fails."""
    if launcher == "torchrun":
        launch = ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    else:
        launch = ["accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"), "--num_processes", "2",
                  "--main_process_port", str(free_port())]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAICTL_")}
    env["OMP_NUM_THREADS"] = "1"  # two processes on a shared machine; torch would take every core in each
    hooks = out.parent / f"{out.name}.hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(WATCH)
    env["PYTHONPATH"] = os.pathsep.join([str(hooks), *filter(None, [env.get("PYTHONPATH")])])
    env["WATCH_WRITES"] = str(out.resolve())
    result = subprocess.run([sys.executable, "-m", *launch, "-m", "caictl", *map(str, args), "-o", out], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{launcher} caictl {' '.join(map(str, args))}:\n{result.stderr[-4000:]}"
    assert [Path(f"{out}.exit-rank{rank}").read_text() for rank in (0, 1)] == ["group left"] * 2
    return result


def assert_main_process_alone_wrote(out: Path, result: subprocess.CompletedProcess, title: str) -> dict:
    """Process 0 wrote OUT and process 1 nothing but checkpoints there; one caictl.json saying world_size 2, one
    summary, no line of the log twice. Returns caictl.json."""
    info = json.loads((out / "caictl.json").read_text())
    assert info["world_size"] == 2
    assert "caictl.json" in Path(f"{out}.writes-rank0").read_text().split()  # the watch sees writes
    # The trainer's checkpoints keep each process's random state (to resume exactly); the output folder is rank 0's.
    assert [p for p in Path(f"{out}.writes-rank1").read_text().split() if not p.startswith("checkpoints")] == []
    # Less the trainer's progress bar (tqdm), which redraws the same frame after each line it logs.
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert [line for line, count in Counter(lines).items() if count > 1] == []
    assert lines.count(title) == 1  # the summary table's title line
    assert not (out / "checkpoints").exists()
    return info


def pairs(count: int) -> list[dict]:
    return [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"Question {i}: how do I do it?"}],
             "chosen": [{"role": "assistant", "content": ANSWERS[i % 3]}],
             "rejected": [{"role": "assistant", "content": "Sure, here is exactly how."}],
             "p_chosen": [0.6, 0.75, 0.9][i % 3]} for i in range(count)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("multiprocess")
    write_jsonl(folder / "revisions.jsonl", [
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"Question number {i}?"}],
        "initial_response": "Sure.", "steps": [], "response": ANSWERS[i % 3]} for i in range(16)])
    # 15 comparisons in steps of 6: the last step has 3, so one process has a row fewer (train_pm.shard).
    write_jsonl(folder / "prefs.jsonl", pairs(15))
    return folder


@pytest.fixture(scope="module")
def pm_one_process(data, tiny_model) -> tuple[Path, dict]:
    """train-pm in one process (this one): the reference run, and the PM the RL test scores with."""
    out = data / "pm-1"
    metrics = train_pm.run(train_pm.TrainPMConfig(prefs=[str(data / "prefs.jsonl")], out=str(out),
                                                  model=str(tiny_model), batch_size=6, learning_rate=1e-3,
                                                  max_length=64))
    return out, metrics


@pytest.mark.slow
def test_sft_under_torchrun_and_accelerate_matches_one_process(tmp_path, data, tiny_model):
    options = ["--model", tiny_model, "--max-steps", "3", "--batch-size", "4", "--learning-rate", "1e-3",
               "--max-length", "64"]
    one = sft.run(sft.SFTConfig(revisions=[str(data / "revisions.jsonl")], out=str(tmp_path / "one"),
                                model=str(tiny_model), max_steps=3, batch_size=4, learning_rate=1e-3, max_length=64))
    for launcher in ("torchrun", "accelerate"):
        out = tmp_path / launcher
        result = two_processes("sft", data / "revisions.jsonl", *options, out=out, launcher=launcher)
        info = assert_main_process_alone_wrote(out, result, "sft")
        two = info["metrics"]["loss_history"]
        assert [h["step"] for h in two] == [h["step"] for h in one["loss_history"]] == [1, 2, 3]
        assert [h["loss"] for h in two] == pytest.approx([h["loss"] for h in one["loss_history"]], **SAME_LOSS)
        assert {p.name for p in out.iterdir()} >= {"caictl.json", "config.json", "model.safetensors", "loss.png"}


@pytest.mark.slow
def test_train_pm_under_torchrun_matches_one_process(tmp_path, data, tiny_model, pm_one_process):
    _, one = pm_one_process
    out = tmp_path / "pm-2"
    result = two_processes("train-pm", data / "prefs.jsonl", "--model", tiny_model, "--batch-size", "6",
                           "--learning-rate", "1e-3", "--max-length", "64", out=out)
    info = assert_main_process_alone_wrote(out, result, "train-pm")
    two = info["metrics"]["loss_history"]
    assert len(two) == len(one["loss_history"]) == 3
    assert [h["loss"] for h in two] == pytest.approx([h["loss"] for h in one["loss_history"]], **SAME_LOSS)
    assert [h["accuracy"] for h in two] == [h["accuracy"] for h in one["loss_history"]]
    assert info["metrics"]["train_comparisons"] == 15


@pytest.mark.slow
def test_train_pm_selection_under_torchrun_keeps_and_stops_at_the_one_process_epoch(tmp_path, data, tiny_model):
    """Every process measures the selection set after each epoch and takes the main process's verdict: the run keeps
    the epoch one process keeps and both processes stop together (one that went on alone would wait forever)."""
    # The labels turned around: the better the PM learns prefs.jsonl, the worse it does here, so an early epoch is
    # the best and training stops.
    select = write_jsonl(tmp_path / "select.jsonl", [{**row, "chosen": row["rejected"], "rejected": row["chosen"]}
                                                     for row in pairs(7)])  # 7: a process scores one more
    options = dict(batch_size=6, learning_rate=1e-3, max_length=64, epochs=6, patience=1)
    one = train_pm.run(train_pm.TrainPMConfig(prefs=[str(data / "prefs.jsonl")], out=str(tmp_path / "one"),
                                              model=str(tiny_model), select_on=str(select), **options))
    out = tmp_path / "two"
    result = two_processes("train-pm", data / "prefs.jsonl", "--model", tiny_model, "--select-on", select,
                           *[f"--{k.replace('_', '-')}={v}" for k, v in options.items()], out=out)
    two = assert_main_process_alone_wrote(out, result, "train-pm")["metrics"]
    assert one["selection"]["stopped_early"] and one["epochs_run"] < 6, one["curve"]
    assert two["selection"] == one["selection"] and two["epochs_run"] == one["epochs_run"]
    for mine, theirs in zip(two["curve"], one["curve"]):
        assert mine["eval"][str(select)]["accuracy"] == theirs["eval"][str(select)]["accuracy"]
        assert mine["eval"][str(select)]["loss"] == pytest.approx(theirs["eval"][str(select)]["loss"], **SAME_LOSS)
    texts = [row["chosen"][0]["content"] for row in pairs(3)]
    assert Scorer(out).score(texts) == pytest.approx(Scorer(tmp_path / "one").score(texts), **SAME_LOSS)


@pytest.mark.slow
def test_dpo_under_torchrun_matches_one_process(tmp_path, data, tiny_model):
    one = dpo.run(dpo.DPOConfig(prefs=[str(data / "prefs.jsonl")], out=str(tmp_path / "one"), model=str(tiny_model),
                                max_steps=3, batch_size=4, learning_rate=1e-3, max_length=64))
    out = tmp_path / "two"
    result = two_processes("dpo", data / "prefs.jsonl", "--model", tiny_model, "--max-steps", "3",
                           "--batch-size", "4", "--learning-rate", "1e-3", "--max-length", "64", out=out)
    two = assert_main_process_alone_wrote(out, result, "dpo")["metrics"]["history"]
    # Step 1 is ln 2 whatever the batch (the policy is its reference); steps 2 and 3 tell batches apart.
    assert len(two) == len(one["history"]) == 3 and one["history"][1]["loss"] < 0.69
    for key in ("loss", "margin"):
        assert [h[key] for h in two] == pytest.approx([h[key] for h in one["history"]], **SAME_LOSS)


@pytest.mark.slow
def test_grpo_under_torchrun_generates_the_global_batch(tmp_path, tiny_model, pm_one_process):
    """The rollouts are sampled: TRL seeds each process differently (so they draw different completions), so two
    processes train on other samples than one does and their losses cannot be compared step by step. What the
    split must keep is the global batch: steps x --batch-size rollouts scored in all, whatever the process count."""
    pm, _ = pm_one_process
    options = dict(algo="grpo", steps=2, batch_size=8, num_generations=4, max_new_tokens=8, learning_rate=1e-4,
                   heldout=0.1)
    one = ppo.run(ppo.PPOConfig(prompts=str(EXAMPLES / "red-team.jsonl"), policy=str(tiny_model), pm=str(pm),
                                out=str(tmp_path / "one"), **options))
    out = tmp_path / "two"
    result = two_processes("ppo", EXAMPLES / "red-team.jsonl", "--policy", tiny_model, "--pm", pm, "--algo", "grpo",
                           "--steps", "2", "--batch-size", "8", "--num-generations", "4", "--max-new-tokens", "8",
                           "--learning-rate", "1e-4", "--heldout", "0.1", out=out)
    two = assert_main_process_alone_wrote(out, result, "ppo --algo grpo")["metrics"]
    assert one["rollouts"] == two["rollouts"] == 2 * 8
    assert one["steps"] == two["steps"] == len(two["history"]) == 2
    assert two["heldout_reward_before"] == one["heldout_reward_before"]  # measured by the main process alone


def test_several_processes_refuse_caictl_ppo_and_an_uneven_batch(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="--algo ppo runs in one process"):
        ppo.PPOConfig(prompts=None, policy=str(tmp_path), pm=str(tmp_path), out=str(tmp_path / "o")).check()
    ppo.PPOConfig(prompts=None, policy=str(tmp_path), pm=str(tmp_path), out=str(tmp_path / "o"), algo="grpo",
                  batch_size=8).check()
    for config in (sft.SFTConfig(revisions=[str(tmp_path)], out="o", batch_size=3),
                   dpo.DPOConfig(prefs=[str(tmp_path)], out="o", batch_size=5),
                   train_pm.TrainPMConfig(prefs=[str(tmp_path)], out="o", batch_size=7)):
        with pytest.raises(UsageError, match="shared by the 2 processes: give a multiple of 2"):
            config.check()


def test_shards_cover_the_batch_once_and_pad_with_weight_zero():
    assert train_pm.shard(list("abcde"), 0, 2) == (list("ace"), [1.0, 1.0, 1.0])
    assert train_pm.shard(list("abcde"), 1, 2) == (list("bda"), [1.0, 1.0, 0.0])
    assert train_pm.shard(list("a"), 1, 2) == (list("a"), [0.0])
    assert train_pm.shard(list("abc"), 0, 1) == (list("abc"), [1.0, 1.0, 1.0])


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero3"])
def test_accelerate_configs_parse_as_accelerate_launch_reads_them(name, monkeypatch):
    """FSDP and ZeRO-3 need GPUs (and DeepSpeed) to run; here each file goes through accelerate launch's own
    reading: its argument parser and config loader, then the plugin built from the environment it would set."""
    from accelerate import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = CONFIGS / f"{name}.yaml"
    assert path.read_text().startswith("# ")  # says what it is for
    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    args, defaults, _ = _validate_launch_command(parser.parse_args(["--config_file", str(path), "-m", "caictl"]))
    # accelerate copies unknown keys through silently: a misspelt one would do nothing.
    assert set(defaults.fsdp_config) | set(defaults.deepspeed_config) <= known
    if name == "ddp":
        assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    elif name == "fsdp":
        for key, value in prepare_multi_gpu_env(args).items():
            monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"
    else:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        for key, value in prepare_deepspeed_cmd_env(args)[1].items():
            monkeypatch.setenv(key, value)
        plugin = DeepSpeedPlugin()
        assert plugin.zero_stage == 3 and plugin.zero3_save_16bit_model
