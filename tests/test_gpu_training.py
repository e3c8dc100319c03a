"""Training precision: what each stage loads and computes in on a GPU with bf16 (faked here: only the decisions, the
TRL arguments and the loaded dtypes are read, nothing runs on "cuda"), why fp32 master weights are the default, and
caictl's PPO measuring the held-out reward on the models it already holds."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from conftest import EXAMPLES

from caictl.errors import UsageError
from caictl.models.training import precision
from caictl.stages import dpo, ppo, sft, train_pm

CONVERSATION = [{"role": "user", "content": "Is it safe?"}, {"role": "assistant", "content": "Mostly, yes."}]
PAIR = {"prompt": [{"role": "user", "content": "Is it safe?"}],
        "chosen": [{"role": "assistant", "content": "Mostly, yes."}],
        "rejected": [{"role": "assistant", "content": "Sure, here is how."}]}
# A stage's options, and the dtype its trained weights are then held in on a GPU with bf16.
WEIGHTS = [pytest.param({}, torch.float32, id="default"), pytest.param({"pure_bf16": True}, torch.bfloat16,
                                                                         id="pure-bf16")]


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch reports a CUDA GPU with bf16; modules asked to move to it stay on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    real_to = torch.nn.Module.to

    def stay_on_cpu(module, *args, **kwargs):
        def cuda(value):
            return isinstance(value, (str, torch.device)) and torch.device(value).type == "cuda"

        args = tuple(a for a in args if not cuda(a))
        if cuda(kwargs.get("device")):
            del kwargs["device"]
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", stay_on_cpu)


@pytest.fixture(scope="module")
def bf16_folders(tmp_path_factory, tiny_model, tiny_pm):
    """The tiny policy and PM saved in bf16, as a GPU run or a hub checkpoint leaves them: loading them "auto" would
    give bf16 weights."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("bf16")
    for name, source, model_class in (("policy", tiny_model, AutoModelForCausalLM),
                                      ("pm", tiny_pm, AutoModelForSequenceClassification)):
        model_class.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(root / name)
        AutoTokenizer.from_pretrained(source).save_pretrained(root / name)
    return SimpleNamespace(policy=root / "policy", pm=root / "pm")


def dtypes(model, trainable: bool | None = None) -> set:
    """The dtypes of a model's parameters: those that train, those that do not, or (None) all."""
    return {p.dtype for p in model.parameters() if trainable in (None, p.requires_grad)}


# The decision -----------------------------------------------------------------------------------------------


def test_precision_is_fp32_on_a_cpu_and_pure_bf16_is_refused_there():
    chosen = precision()
    assert (chosen.load, chosen.frozen, chosen.autocast, chosen.label) == (torch.float32, torch.float32, None, "fp32")
    assert precision(lora=True) == chosen
    with pytest.raises(UsageError, match="--pure-bf16 needs a CUDA GPU with bf16"):
        precision(pure_bf16=True)


def test_precision_on_a_gpu_with_bf16(fake_gpu):
    bf16, fp32 = torch.bfloat16, torch.float32
    table = {(False, False): (fp32, bf16, bf16, "fp32 master, bf16 autocast"),
             (True, False): (bf16, bf16, bf16, "bf16"),
             (False, True): (bf16, bf16, bf16, "bf16 base, fp32 LoRA, bf16 autocast")}
    for (pure_bf16, lora), expected in table.items():
        chosen = precision(pure_bf16, lora)
        assert (chosen.load, chosen.frozen, chosen.autocast, chosen.label) == expected
    with pytest.raises(UsageError, match="--pure-bf16 applies to full fine-tuning"):
        precision(pure_bf16=True, lora=True)


def test_a_gpu_without_bf16_trains_in_fp32(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert precision().label == "fp32" and precision().autocast is None
    with pytest.raises(UsageError):
        precision(pure_bf16=True)


def test_one_adamw_step_moves_every_fp32_master_weight_and_few_bf16_ones(fake_gpu, monkeypatch):
    """Why fp32 master weights are the default: AdamW's first step is about the learning rate for every weight,
    under half a bf16 step for any weight above ~0.004 in size; bf16 weights keep most of their old values."""
    dtypes = {pure_bf16: precision(pure_bf16=pure_bf16).load for pure_bf16 in (False, True)}
    monkeypatch.undo()  # the optimizer's step asks CUDA for its stream when torch says there is a GPU
    torch.manual_seed(0)
    initial = torch.nn.init.normal_(torch.empty(256, 256), std=0.02)
    inputs = torch.randn(8, 256)
    moved = {}
    for pure_bf16, dtype in dtypes.items():
        layer = torch.nn.Linear(256, 256, bias=False)
        layer.weight.data = initial.to(dtype, copy=True)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-5)
        layer(inputs.to(dtype)).square().sum().backward()
        optimizer.step()
        moved[pure_bf16] = (layer.weight.detach() != initial.to(dtype)).float().mean().item()
    assert moved[False] == 1.0
    assert moved[True] < 0.3  # about the share of N(0, 0.02) weights under 0.004 in size


# What each stage loads and computes in ------------------------------------------------------------------------


class Stop(Exception):
    """Raised by a stand-in TRL trainer once it has seen what the stage built."""


def stand_in_trl(monkeypatch, name: str) -> dict:
    """Replaces trl's {name}Config and {name}Trainer: the config keeps its keyword arguments (it would set up CUDA),
    the trainer records what it is given and stops the stage. Returns what they saw."""
    import trl

    seen = {}
    real_config = getattr(trl, f"{name}Config")

    def config(**kwargs):
        seen["config"] = kwargs
        return SimpleNamespace(**kwargs)

    class trainer:  # a class: caictl subclasses TRL's trainers
        def __init__(self, **kwargs):
            seen.update(kwargs)
            raise Stop

    config.__dataclass_fields__ = real_config.__dataclass_fields__
    monkeypatch.setattr(trl, f"{name}Config", config)
    monkeypatch.setattr(trl, f"{name}Trainer", trainer)
    return seen


@pytest.mark.parametrize("options, weights", WEIGHTS)
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_sft_and_dpo_train_fp32_masters_under_bf16_autocast_on_a_gpu(fake_gpu, monkeypatch, tmp_path, tiny_model,
                                                                     stage, options, weights):
    name = {"sft": "SFT", "dpo": "DPO"}[stage]
    seen = stand_in_trl(monkeypatch, name)
    with pytest.raises(Stop):
        if stage == "sft":
            sft.prepare(sft.SFTConfig(revisions=[], out=str(tmp_path), **options), str(tiny_model), [CONVERSATION])
        else:
            dpo.prepare(dpo.DPOConfig(prefs=[], out=str(tmp_path), **options), str(tiny_model), [PAIR])
    assert seen["config"]["bf16"] is True and seen["config"]["use_cpu"] is False
    assert dtypes(seen["model"], trainable=True) == {weights}
    if stage == "dpo":  # the reference never trains: bf16 either way
        assert dtypes(seen["ref_model"]) == {torch.bfloat16}


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_sft_and_dpo_lora_keep_a_bf16_base_on_a_gpu(fake_gpu, monkeypatch, tmp_path, tiny_model, stage):
    name = {"sft": "SFT", "dpo": "DPO"}[stage]
    seen = stand_in_trl(monkeypatch, name)
    with pytest.raises(Stop):
        if stage == "sft":
            sft.prepare(sft.SFTConfig(revisions=[], out=str(tmp_path), lora=True), str(tiny_model), [CONVERSATION])
        else:
            dpo.prepare(dpo.DPOConfig(prefs=[], out=str(tmp_path), lora=True), str(tiny_model), [PAIR])
    # The adapters are added by TRL, in fp32 (peft's default), and the reference is the base with them off.
    assert seen["config"]["bf16"] is True and seen["peft_config"] is not None
    assert dtypes(seen["model"]) == {torch.bfloat16}
    assert seen.get("ref_model") is None


@pytest.mark.parametrize("options, weights", WEIGHTS)
@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_trl_rloo_and_grpo_load_the_policy_in_fp32_on_a_gpu(fake_gpu, monkeypatch, tmp_path, tiny_model, algo,
                                                             options, weights):
    from caictl.rl import trl as rl_trl

    seen = stand_in_trl(monkeypatch, algo.upper())
    monkeypatch.setattr(rl_trl, "reward_model", lambda config: SimpleNamespace(cuts=lambda: None))
    config = ppo.PPOConfig(prompts=None, policy=str(tiny_model), pm=None, out=str(tmp_path), algo=algo,
                           batch_size=4, **options)
    with pytest.raises(Stop):
        rl_trl.run_trl(config, [SimpleNamespace(messages=CONVERSATION[:1])] * 4, [])
    # TRL loads the policy from the folder itself, in model_init_kwargs' dtype.
    assert seen["model"] == str(tiny_model) and seen["config"]["bf16"] is True
    assert seen["config"]["model_init_kwargs"]["dtype"] == weights


def stand_in_accelerator(monkeypatch) -> dict:
    """accelerate's Accelerator would set up CUDA: a stand-in keeps its keyword arguments and the CPU."""
    import accelerate

    seen = {}

    def accelerator(**kwargs):
        seen.update(kwargs)
        return SimpleNamespace(device=torch.device("cpu"))

    monkeypatch.setattr(accelerate, "Accelerator", accelerator)
    return seen


@pytest.mark.parametrize("options, weights", WEIGHTS)
def test_train_pm_trains_fp32_masters_under_bf16_autocast_on_a_gpu(fake_gpu, monkeypatch, tmp_path, bf16_folders,
                                                                   options, weights):
    seen = stand_in_accelerator(monkeypatch)
    trainer = train_pm.Trainer(train_pm.TrainPMConfig(prefs=[], out=str(tmp_path), **options), str(bf16_folders.pm))
    assert seen["mixed_precision"] == "bf16" and dtypes(trainer.model, trainable=True) == {weights}
    assert trainer.precision.label == ("bf16" if options else "fp32 master, bf16 autocast")


def test_train_pm_lora_trains_fp32_adapters_and_head_on_a_bf16_base(fake_gpu, monkeypatch, tmp_path, bf16_folders):
    seen = stand_in_accelerator(monkeypatch)
    trainer = train_pm.Trainer(train_pm.TrainPMConfig(prefs=[], out=str(tmp_path), lora=True), str(bf16_folders.pm))
    assert seen["mixed_precision"] == "bf16"
    assert dtypes(trainer.model, trainable=False) == {torch.bfloat16}
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad and p.dtype == torch.float32}
    assert any("score" in n for n in trained) and any("lora_" in n for n in trained)
    assert dtypes(trainer.model, trainable=True) == {torch.float32}


def ppo_config(policy, pm, out, **options) -> ppo.PPOConfig:
    """caictl's PPO at a size that runs in seconds; options override."""
    defaults = dict(prompts=str(EXAMPLES / "red-team.jsonl"), policy=str(policy), pm=str(pm), out=str(out), steps=1,
                    batch_size=2, minibatch_size=2, ppo_epochs=1, max_new_tokens=8, heldout=0)
    return ppo.PPOConfig(**{**defaults, **options})


@pytest.mark.parametrize("options, weights", WEIGHTS)
def test_ppo_holds_fp32_masters_and_a_bf16_reference_on_a_gpu(fake_gpu, monkeypatch, tmp_path, bf16_folders,
                                                              options, weights):
    from caictl.rl.ppo import PPO

    trainer = PPO(ppo_config(bf16_folders.policy, bf16_folders.pm, tmp_path, **options))
    assert dtypes(trainer.policy, trainable=True) == {weights}
    assert dtypes(trainer.reference) == {torch.bfloat16}
    assert dtypes(trainer.value_head, trainable=True) == {torch.float32}
    # The policy's and the reference's forward passes run under bf16 autocast (recorded here, run on the CPU).
    entered = []

    @contextlib.contextmanager
    def recording_autocast(device, dtype):
        entered.append((device, dtype))
        yield

    monkeypatch.setattr(torch, "autocast", recording_autocast)
    ids = trainer.tokenizer(["Hello there, how are you"], return_tensors="pt").input_ids
    rollout = {"ids": ids, "attention": torch.ones_like(ids), "start": 3}
    with torch.no_grad():
        trainer.forward(rollout["ids"], rollout["attention"], rollout["start"])
        trainer.reference_logprobs(rollout)
    assert entered == [("cuda", torch.bfloat16)] * 2


def test_ppo_lora_keeps_a_bf16_base_and_fp32_adapters_on_a_gpu(fake_gpu, tmp_path, bf16_folders):
    from caictl.rl.ppo import PPO

    trainer = PPO(ppo_config(bf16_folders.policy, bf16_folders.pm, tmp_path, lora=True))
    assert trainer.reference is None  # the base with the adapter switched off
    assert dtypes(trainer.policy, trainable=False) == {torch.bfloat16}
    assert dtypes(trainer.policy, trainable=True) == {torch.float32}


# The held-out reward on the models in memory ----------------------------------------------------------------


class RecordingScorer:
    def __init__(self, scorer):
        self.scorer, self.responses = scorer, []

    def score_responses(self, prompts, responses):
        self.responses += responses
        return self.scorer.score_responses(prompts, responses)


@pytest.mark.parametrize("lora, loads", [(False, 2), (True, 1)])
def test_ppo_loads_the_policy_once_per_model_it_holds(monkeypatch, tmp_path, tiny_model, tiny_pm, lora, loads):
    """The policy and the reference (LoRA: the policy alone) are loaded once each; the held-out reward before and
    after training samples from them rather than from more copies of --policy and OUT, and the responses are those
    the folders give (on a CPU both are fp32)."""
    from transformers import AutoModelForCausalLM

    from caictl.rl import ppo as rl_ppo

    loaded = []
    real_from_pretrained = AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        loaded.append(str(args[0]))
        return real_from_pretrained(*args, **kwargs)

    measured = []
    real_heldout_reward = rl_ppo.heldout_reward

    def recording(folder, prompts, scorer, config, *args, **kwargs):
        recorder = RecordingScorer(scorer)
        measured.append((folder, prompts, recorder, config))
        return real_heldout_reward(folder, prompts, recorder, config, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting)
    monkeypatch.setattr(rl_ppo, "heldout_reward", recording)
    config = ppo_config(tiny_model, tiny_pm, tmp_path / "rl", heldout=0.1, learning_rate=1e-2, lora=lora)
    metrics = ppo.run(config)
    assert loaded == [str(tiny_model)] * loads
    monkeypatch.undo()

    (before, *_), (after, *_) = measured
    assert (str(before), str(after)) == (str(tiny_model), str(tmp_path / "rl"))
    from caictl.models.pm import Scorer

    for folder, prompts, recorder, config in measured:
        from_folder = RecordingScorer(Scorer(config.pm))
        real_heldout_reward(folder, prompts, from_folder, config)
        assert recorder.responses == from_folder.responses and len(prompts) == 5
    assert metrics["heldout_reward_before"] is not None and metrics["heldout_reward_after"] is not None
