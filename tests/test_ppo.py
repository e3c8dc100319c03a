"""caictl ppo: the arithmetic against hand-worked numbers, then a policy that learns what a PM rewards."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EXAMPLES, caictl, caictl_in_process, write_jsonl

from caictl.data.reading import read_prompts
from caictl.data.records import Prompt
from caictl.rl import ppo_math
from caictl.rl.ppo import PPO, boilerplate_share
from caictl.rl.reward import heldout_reward
from caictl.stages import init_model as tiny
from caictl.stages import ppo, sft, train_pm


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    mask = torch.ones(1, 3)
    # gamma = lam = 1: deltas (0, 0, 0.5), advantages all 0.5, returns A + V = 1.
    advantages, returns = ppo_math.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[0.5, 0.5, 0.5]] and returns.tolist() == [[1.0, 1.0, 1.0]]
    # lam = 0.5: A2 = 0.5, A1 = 0 + 0.5 * 0.5, A0 = 0.5 * 0.25.
    advantages, _ = ppo_math.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert advantages.tolist() == [[0.125, 0.25, 0.5]]
    # gamma = 0.9, lam = 1, last step masked out: the reward sits on step 1, step 2 counts for nothing.
    rewards = torch.tensor([[0.0, 1.0, 7.0]])
    advantages, _ = ppo_math.gae(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), gamma=0.9, lam=1.0)
    # delta1 = 1 + 0.9 * 0 - 0.5 = 0.5; delta0 = 0 + 0.9 * 0.5 - 0.5 = -0.05; A0 = -0.05 + 0.9 * 0.5 = 0.4
    assert advantages[0].tolist() == pytest.approx([0.4, 0.5, 0.0])


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    mask = torch.ones(1, 2)
    # A = +1: -min(1.5, 1.2) = -1.2 (clipped); A = -1 at ratio 0.5: max(0.5, 0.8) = 0.8 (clipped).
    loss, fraction = ppo_math.policy_loss(new, old, torch.tensor([[1.0, -1.0]]), mask, clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2) and fraction == 1.0
    # Inside the clip range nothing is clipped: ratio 1.1, A = 2 -> -2.2.
    loss, fraction = ppo_math.policy_loss(torch.log(torch.tensor([[1.1]])), torch.zeros(1, 1), torch.tensor([[2.0]]),
                                     torch.ones(1, 1), clip_range=0.2)
    assert loss.item() == pytest.approx(-2.2) and fraction == 0.0


def test_clipped_value_loss_and_kl_controller_by_hand():
    # V = 2 from V_old = 0 clips to 0.2; R = 1: max((2 - 1)^2, (0.2 - 1)^2) = 1 -> 0.5.
    loss = ppo_math.value_loss(torch.tensor([[2.0]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.5)
    # KL at twice the target: the error clips to +0.2, scaled by batch / horizon.
    assert ppo_math.adaptive_kl(0.1, kl=2.0, target=1.0, batch=100, horizon=1000) == pytest.approx(0.1 * 1.02)
    assert ppo_math.adaptive_kl(0.1, kl=0.9, target=1.0, batch=100, horizon=1000) == pytest.approx(0.1 * 0.99)


def test_whiten_and_boilerplate():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    whitened = ppo_math.whiten(values, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert whitened[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6) and whitened[0, 3].item() == 0.0
    stock = "I am only an AI and cannot help with that request"
    assert boilerplate_share([stock + " today", stock + " sorry", "A plain useful answer here"]) == \
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
        {"prompt": [{"role": "user", "content": f"Question {i}?"}],
         "chosen": [{"role": "assistant", "content": "Yes."}],
         "rejected": [{"role": "assistant", "content": long}]} for i in range(64)])
    backbone = tiny.run(tiny.InitModelConfig(out=folder / "pm-base", preset="tiny", task="seq-cls", seed=1))
    train_pm.run(train_pm.TrainPMConfig(prefs=[str(prefs)], out=str(folder / "pm"), model=str(backbone), epochs=3,
                                        learning_rate=1e-3))
    return folder


def small_run(setup, out, **options) -> ppo.PPOConfig:
    """caictl's PPO on the short-answer setup at a size that runs in seconds; options override."""
    defaults = dict(prompts=str(EXAMPLES / "red-team.jsonl"), policy=str(setup / "policy"), pm=str(setup / "pm"),
                    out=str(out), steps=2, batch_size=4, minibatch_size=2, ppo_epochs=2, max_new_tokens=8, heldout=0)
    return ppo.PPOConfig(**{**defaults, **options})


def direct_logprobs(model, ids, attention, start: int, temperature: float):
    """The oracle, computed here: [batch, response width, vocabulary] log-probs of softmax(logits / T) at each
    response position, with positions counted over attended tokens only."""
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits[:, start - 1:-1]
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def token_logprobs(logprobs_all, ids, start: int):
    return logprobs_all.gather(-1, ids[:, start:].unsqueeze(-1)).squeeze(-1)


def test_ppo_logprobs_and_entropy_are_those_of_the_sampling_temperature(tmp_path, short_answer_setup):
    trainer = PPO(small_run(short_answer_setup, tmp_path, temperature=0.7))
    rollout = trainer.rollout(read_prompts(EXAMPLES / "red-team.jsonl")[:4])
    ids, attention, start, mask = rollout["ids"], rollout["attention"], rollout["start"], rollout["mask"].bool()
    with torch.no_grad():
        logprobs, _, entropy = trainer.forward(ids, attention, start)
        reference = trainer.reference_logprobs(rollout)
    expected = direct_logprobs(trainer.policy, ids, attention, start, temperature=0.7)
    assert torch.allclose(logprobs[mask], token_logprobs(expected, ids, start)[mask], atol=1e-5)
    # No update yet, so the reference is the same model and must be tempered the same way.
    assert torch.allclose(reference[mask], token_logprobs(expected, ids, start)[mask], atol=1e-5)
    assert torch.allclose(entropy[mask], -(expected.exp() * expected).sum(-1)[mask], atol=1e-4)


@pytest.fixture(scope="module")
def absolute_positions_policy(tmp_path_factory, tiny_model):
    """A GPT-2-shaped policy with random weights. Its learned absolute positions make a misplaced token change the
    output; the Llama-shaped tiny model's rotary positions are relative, so shifting them all changes nothing."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=2, n_head=4,
                                       bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_left_padded_rollout_scores_as_each_row_would_alone(tmp_path, short_answer_setup,
                                                               absolute_positions_policy):
    trainer = PPO(small_run(short_answer_setup, tmp_path, policy=str(absolute_positions_policy)))
    torch.nn.init.normal_(trainer.value_head.weight)  # zero at the start: values would agree whatever they read
    prompts = [Prompt("short", [{"role": "user", "content": "Hi?"}]),
               Prompt("long", [{"role": "user", "content": "Could you tell me, at some length and with examples, "
                                                           "how a preference model is trained?"}])]
    rollout = trainer.rollout(prompts)
    start = rollout["start"]
    padding = (rollout["attention"][:, :start] == 0).sum(1).tolist()
    assert padding[0] > 10 and padding[1] == 0
    with torch.no_grad():
        logprobs, values, _ = trainer.forward(rollout["ids"], rollout["attention"], start)
        reference = trainer.reference_logprobs(rollout)
    for row, pad in enumerate(padding):
        width = int(rollout["mask"][row].sum())  # response tokens up to and including the end of sequence
        ids = rollout["ids"][row:row + 1, pad:start + width]
        alone = {"ids": ids, "attention": torch.ones_like(ids), "start": start - pad}
        with torch.no_grad():
            alone_logprobs, alone_values, _ = trainer.forward(alone["ids"], alone["attention"], alone["start"])
            alone_reference = trainer.reference_logprobs(alone)
        for batched, single in ((logprobs, alone_logprobs), (values, alone_values), (reference, alone_reference)):
            assert torch.allclose(batched[row, :width], single[0], atol=1e-5)


HELDOUT = {"heldout": 0.1, "max_new_tokens": 8}  # the held-out measurement every path below is checked against


def measured_heldout_reward(setup, folder, **options) -> float:
    from caictl.models.pm import Scorer

    config = small_run(setup, "unused", **{**HELDOUT, **options})
    _, heldout = ppo.split_prompts(read_prompts(config.prompts), config.heldout, config.seed)
    return heldout_reward(folder, heldout, Scorer(config.pm), config)


@pytest.fixture(scope="module")
def heldout_reward_before(short_answer_setup):
    return measured_heldout_reward(short_answer_setup, short_answer_setup / "policy")


def test_the_heldout_reward_depends_on_neither_batching_nor_the_global_rng(short_answer_setup,
                                                                          heldout_reward_before):
    torch.manual_seed(123)
    one_by_one = measured_heldout_reward(short_answer_setup, short_answer_setup / "policy", batch_size=1)
    assert one_by_one == heldout_reward_before
    assert measured_heldout_reward(short_answer_setup, short_answer_setup / "policy", seed=1) != one_by_one


def test_ppo_measures_the_heldout_reward_with_the_shared_function(tmp_path, short_answer_setup,
                                                                  heldout_reward_before):
    metrics = ppo.run(small_run(short_answer_setup, tmp_path / "rl", steps=1, **HELDOUT))
    assert metrics["heldout_reward_before"] == heldout_reward_before
    assert metrics["heldout_reward_after"] == measured_heldout_reward(short_answer_setup, tmp_path / "rl")


def test_rollouts_cut_to_the_pm_max_length_are_counted(tmp_path, short_answer_setup, capfd):
    metrics = ppo.run(small_run(short_answer_setup, tmp_path / "cut", pm_max_length=8))
    # Every rollout (2 steps x 4 prompts) is longer than 8 tokens.
    assert metrics["pm_truncated_rollouts"] == 8 == sum(h["pm_truncated_rollouts"] for h in metrics["history"])
    assert capfd.readouterr().err.count("were longer than --pm-max-length 8") == 1


def test_ppo_logs_every_step(tmp_path, short_answer_setup, capfd):
    metrics = ppo.run(small_run(short_answer_setup, tmp_path / "logged", sample_every=2))
    err = capfd.readouterr().err
    for h in metrics["history"]:
        assert (f"step {h['step']}/2: reward {h['reward_mean']:.3f}, kl {h['kl']:.3f}, "
                f"response length {h['response_length']:.1f} tokens") in err
    assert err.count(", sample: ") == 1


@pytest.mark.slow
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
    assert "step 10/24: reward" in result.stderr and ", sample: " in result.stderr  # with a sample every 10 steps
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_max_kl_stops_a_run_that_runs_away(tmp_path, short_answer_setup):
    out = tmp_path / "runaway"
    caictl_in_process("ppo", EXAMPLES / "red-team.jsonl", "--policy", short_answer_setup / "policy", "--pm",
                      short_answer_setup / "pm", "-o", out, "--steps", "30", "--learning-rate", "5e-3",
                      "--kl-coef", "0", "--max-new-tokens", "16", "--max-kl", "0.5", "--heldout", "0")
    metrics = json.loads((out / "caictl.json").read_text())["metrics"]
    assert metrics["stopped"] and "exceeded --max-kl 0.5" in metrics["stopped"] and metrics["steps"] < 30


def test_lora_ppo_keeps_the_adapter_free_base_as_reference(tmp_path, short_answer_setup):
    from transformers import AutoModelForCausalLM

    trainer = PPO(small_run(short_answer_setup, tmp_path, lora=True, learning_rate=1e-2))
    prompts = read_prompts(EXAMPLES / "red-team.jsonl")
    # LoRA starts as a no-op: the first rollout is sampled before any update, so the KL starts at 0.
    assert trainer.step(prompts[:4], 1)["kl"] == pytest.approx(0.0, abs=1e-4)
    for step in (2, 3):
        trainer.step(prompts[4 * step:4 * step + 4], step)
    rollout = trainer.rollout(prompts[:4])
    ids, attention, start, mask = rollout["ids"], rollout["attention"], rollout["start"], rollout["mask"].bool()
    with torch.no_grad():
        reference = trainer.reference_logprobs(rollout)
        policy = trainer.forward(ids, attention, start)[0]
    base = AutoModelForCausalLM.from_pretrained(short_answer_setup / "policy").eval()
    assert torch.allclose(reference[mask], token_logprobs(direct_logprobs(base, ids, attention, start, 1.0), ids,
                                                          start)[mask], atol=1e-5)
    assert (policy - reference)[mask].abs().max() > 0.05  # the adapter has moved the policy away from it
    # The saved model is the base with the adapter merged in: it scores as the adapted policy does.
    trainer.save(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(policy[mask], token_logprobs(direct_logprobs(merged, ids, attention, start, 1.0), ids,
                                                       start)[mask], atol=1e-4)


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_trl_rloo_and_grpo_run_end_to_end(tmp_path, short_answer_setup, heldout_reward_before, algo):
    out = tmp_path / algo
    caictl_in_process("ppo", EXAMPLES / "red-team.jsonl", "--policy", short_answer_setup / "policy", "--pm",
                      short_answer_setup / "pm", "-o", out, "--algo", algo, "--steps", "2", "--batch-size", "8",
                      "--num-generations", "4", "--max-new-tokens", str(HELDOUT["max_new_tokens"]),
                      "--learning-rate", "1e-4", "--heldout", str(HELDOUT["heldout"]))
    metrics = json.loads((out / "caictl.json").read_text())["metrics"]
    assert metrics["algo"] == algo and metrics["steps"] == 2
    # The number caictl's own PPO reports too (test_ppo_measures_the_heldout_reward_with_the_shared_function).
    assert metrics["heldout_reward_before"] == heldout_reward_before
    assert metrics["heldout_reward_after"] == measured_heldout_reward(short_answer_setup, out)
    assert all(h["kl"] is not None and h["reward_mean"] is not None for h in metrics["history"])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_a_resumed_ppo_run_ends_bit_equal_to_an_uninterrupted_one(tmp_path, short_answer_setup, monkeypatch):
    from safetensors.torch import load_file

    # --target-kl moves the KL coefficient and a held-out share sets a reward before training: both must be restored.
    options = dict(steps=4, save_every=2, learning_rate=1e-3, kl_coef=0.1, target_kl=0.01, **HELDOUT)
    whole = ppo.run(small_run(short_answer_setup, tmp_path / "whole", **options))
    assert whole["kl_coef_final"] != options["kl_coef"]

    original_step, steps_taken = PPO.step, []

    def step_then_die(self, prompts, step):
        if step == 3:
            raise KeyboardInterrupt  # killed after the step-2 checkpoint
        return original_step(self, prompts, step)

    def counted_step(self, prompts, step):
        steps_taken.append(step)
        return original_step(self, prompts, step)

    monkeypatch.setattr(PPO, "step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        ppo.run(small_run(short_answer_setup, tmp_path / "resumed", **options))
    assert (tmp_path / "resumed" / "checkpoint" / "state.pt").exists()
    monkeypatch.setattr(PPO, "step", counted_step)
    resumed = ppo.run(small_run(short_answer_setup, tmp_path / "resumed", **options))
    assert steps_taken == [3, 4]  # it started from the checkpoint, not from scratch
    assert not (tmp_path / "resumed" / "checkpoint").exists()

    timing = ("seconds", "seconds_per_step")
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}
    for name in ("model.safetensors", "value_head.pt"):
        load = load_file if name.endswith(".safetensors") else torch.load
        expected, got = load(tmp_path / "whole" / name), load(tmp_path / "resumed" / name)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), name


def test_resume_without_a_checkpoint_is_refused(tmp_path, short_answer_setup):
    refused = caictl("ppo", EXAMPLES / "red-team.jsonl", "--policy", short_answer_setup / "policy", "--pm",
                     short_answer_setup / "pm", "-o", tmp_path / "fresh", "--resume", check=False)
    assert refused.returncode == 2 and "--resume: no checkpoint" in refused.stderr
