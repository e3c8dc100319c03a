"""caictl ppo: the arithmetic against hand-worked numbers, then a policy that learns what a PM rewards."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EXAMPLES, caictl, write_jsonl

from caictl import tiny
from caictl.stages import ppo, sft, train_pm


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    mask = torch.ones(1, 3)
    # gamma = lam = 1: deltas (0, 0, 0.5), advantages all 0.5, returns A + V = 1.
    advantages, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[0.5, 0.5, 0.5]] and returns.tolist() == [[1.0, 1.0, 1.0]]
    # lam = 0.5: A2 = 0.5, A1 = 0 + 0.5 * 0.5, A0 = 0.5 * 0.25.
    advantages, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert advantages.tolist() == [[0.125, 0.25, 0.5]]
    # gamma = 0.9, lam = 1, last step masked out: the reward sits on step 1, step 2 counts for nothing.
    rewards = torch.tensor([[0.0, 1.0, 7.0]])
    advantages, _ = ppo.gae(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), gamma=0.9, lam=1.0)
    # delta1 = 1 + 0.9 * 0 - 0.5 = 0.5; delta0 = 0 + 0.9 * 0.5 - 0.5 = -0.05; A0 = -0.05 + 0.9 * 0.5 = 0.4
    assert advantages[0].tolist() == pytest.approx([0.4, 0.5, 0.0])


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    mask = torch.ones(1, 2)
    # A = +1: -min(1.5, 1.2) = -1.2 (clipped); A = -1 at ratio 0.5: max(0.5, 0.8) = 0.8 (clipped).
    loss, fraction = ppo.policy_loss(new, old, torch.tensor([[1.0, -1.0]]), mask, clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2) and fraction == 1.0
    # Inside the clip range nothing is clipped: ratio 1.1, A = 2 -> -2.2.
    loss, fraction = ppo.policy_loss(torch.log(torch.tensor([[1.1]])), torch.zeros(1, 1), torch.tensor([[2.0]]),
                                     torch.ones(1, 1), clip_range=0.2)
    assert loss.item() == pytest.approx(-2.2) and fraction == 0.0


def test_clipped_value_loss_and_kl_controller_by_hand():
    # V = 2 from V_old = 0 clips to 0.2; R = 1: max((2 - 1)^2, (0.2 - 1)^2) = 1 -> 0.5.
    loss = ppo.value_loss(torch.tensor([[2.0]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.5)
    # KL at twice the target: the error clips to +0.2, scaled by batch / horizon.
    assert ppo.adaptive_kl(0.1, kl=2.0, target=1.0, batch=100, horizon=1000) == pytest.approx(0.1 * 1.02)
    assert ppo.adaptive_kl(0.1, kl=0.9, target=1.0, batch=100, horizon=1000) == pytest.approx(0.1 * 0.99)


def test_whiten_and_boilerplate():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    whitened = ppo.whiten(values, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert whitened[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6) and whitened[0, 3].item() == 0.0
    stock = "I am only an AI and cannot help with that request"
    assert ppo.boilerplate_share([stock + " today", stock + " sorry", "A plain useful answer here"]) == \
        pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def short_answer_setup(tmp_path_factory, tiny_model):
    """A policy that sometimes answers briefly and sometimes at length, and a PM that prefers brevity."""
    folder = tmp_path_factory.mktemp("ppo")
    long = "Here is a long and detailed answer that goes on and on about many things at great length."
    revisions = write_jsonl(folder / "rev.jsonl", [
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"Question {i}?"}], "initial_response": "",
         "steps": [], "response": "Yes." if i % 2 else long} for i in range(64)])
    sft.run(sft.SFTConfig(revisions=[str(revisions)], out=str(folder / "policy"), model=str(tiny_model), epochs=6,
                          learning_rate=3e-3, batch_size=16, max_length=128))
    prefs = write_jsonl(folder / "prefs.jsonl", [
        {"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": [{"role": "assistant", "content": "Yes."}],
         "rejected": [{"role": "assistant", "content": long}]} for i in range(64)])
    backbone = tiny.run(tiny.InitModelConfig(out=folder / "pm-base", preset="tiny", task="seq-cls", seed=1))
    train_pm.run(train_pm.TrainPMConfig(prefs=[str(prefs)], out=str(folder / "pm"), model=str(backbone), epochs=3,
                                        learning_rate=1e-3))
    return folder


def test_ppo_raises_the_heldout_reward_within_the_kl_cap(tmp_path, short_answer_setup):
    out = tmp_path / "rl"
    result = caictl("ppo", EXAMPLES / "red-team.jsonl", "--policy", short_answer_setup / "policy",
                    "--pm", short_answer_setup / "pm", "-o", out, "--steps", "24", "--batch-size", "16",
                    "--minibatch-size", "8", "--learning-rate", "5e-4", "--kl-coef", "0.2", "--max-new-tokens", "24",
                    "--heldout", "0.2", "--max-kl", "10")
    metrics = json.loads((out / "caictl.json").read_text())["metrics"]
    assert metrics["stopped"] is None and metrics["steps"] == 24
    assert metrics["heldout_reward_after"] > metrics["heldout_reward_before"] + 0.2
    assert 0 <= metrics["kl"] < 10
    history = metrics["history"]
    assert sum(h["response_length"] for h in history[-4:]) < sum(h["response_length"] for h in history[:4])
    for key in ("reward_mean", "reward_std", "kl", "entropy", "clip_fraction", "value_loss", "response_length",
                "boilerplate_share"):
        assert key in history[0]
    assert (out / "ppo.png").exists() and (out / "value_head.pt").exists()
    assert "step 10:" in result.stderr  # sample responses are logged
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_max_kl_stops_a_run_that_runs_away(tmp_path, short_answer_setup):
    out = tmp_path / "runaway"
    caictl("ppo", EXAMPLES / "red-team.jsonl", "--policy", short_answer_setup / "policy", "--pm",
           short_answer_setup / "pm", "-o", out, "--steps", "30", "--learning-rate", "5e-3", "--kl-coef", "0",
           "--max-new-tokens", "16", "--max-kl", "0.5", "--heldout", "0")
    metrics = json.loads((out / "caictl.json").read_text())["metrics"]
    assert metrics["stopped"] and "exceeded --max-kl 0.5" in metrics["stopped"] and metrics["steps"] < 30


def test_lora_ppo_uses_the_adapter_free_model_as_reference(tmp_path, short_answer_setup):
    out = tmp_path / "lora"
    caictl("ppo", EXAMPLES / "red-team.jsonl", "--policy", short_answer_setup / "policy", "--pm",
           short_answer_setup / "pm", "-o", out, "--steps", "2", "--lora", "--max-new-tokens", "8",
           "--learning-rate", "1e-3", "--heldout", "0")
    metrics = json.loads((out / "caictl.json").read_text())["metrics"]
    # The first rollout is sampled before any update: policy and reference agree, so the KL starts at 0.
    assert metrics["history"][0]["kl"] == pytest.approx(0.0, abs=1e-4)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)



@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_trl_rloo_and_grpo_run_end_to_end(tmp_path, short_answer_setup, algo):
    out = tmp_path / algo
    caictl("ppo", EXAMPLES / "red-team.jsonl", "--policy", short_answer_setup / "policy", "--pm",
           short_answer_setup / "pm", "-o", out, "--algo", algo, "--steps", "2", "--batch-size", "8",
           "--num-generations", "4", "--max-new-tokens", "8", "--learning-rate", "1e-4", "--heldout", "0.1")
    metrics = json.loads((out / "caictl.json").read_text())["metrics"]
    assert metrics["algo"] == algo and metrics["steps"] == 2
    assert metrics["heldout_reward_before"] is not None and metrics["heldout_reward_after"] is not None
    assert all(h["kl"] is not None and h["reward_mean"] is not None for h in metrics["history"])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_an_interrupted_ppo_run_resumes_from_its_checkpoint(tmp_path, short_answer_setup):
    out = tmp_path / "resumed"
    config = ppo.PPOConfig(prompts=str(EXAMPLES / "red-team.jsonl"), policy=str(short_answer_setup / "policy"),
                           pm=str(short_answer_setup / "pm"), out=str(out), steps=3, save_every=2, batch_size=8,
                           minibatch_size=4, max_new_tokens=8, learning_rate=1e-4, heldout=0)
    original_step = ppo.PPO.step

    def step_then_die(self, prompts, step):
        if step == 3:
            raise KeyboardInterrupt  # killed after the step-2 checkpoint
        return original_step(self, prompts, step)

    ppo.PPO.step = step_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            ppo.run(config)
    finally:
        ppo.PPO.step = original_step
    assert (out / "checkpoint" / "state.pt").exists() and not (out / "caictl.json").exists()
    result = caictl("ppo", EXAMPLES / "red-team.jsonl", "--policy", short_answer_setup / "policy", "--pm",
                    short_answer_setup / "pm", "-o", out, "--steps", "3", "--save-every", "2", "--batch-size", "8",
                    "--minibatch-size", "4", "--max-new-tokens", "8", "--learning-rate", "1e-4", "--heldout", "0")
    assert "resuming from step 2" in result.stderr
    refused = caictl("ppo", EXAMPLES / "red-team.jsonl", "--policy", short_answer_setup / "policy", "--pm",
                     short_answer_setup / "pm", "-o", tmp_path / "fresh", "--resume", check=False)
    assert refused.returncode == 2 and "--resume: no checkpoint" in refused.stderr
    metrics = json.loads((out / "caictl.json").read_text())["metrics"]
    assert [h["step"] for h in metrics["history"]] == [1, 2, 3]
    assert not (out / "checkpoint").exists()
