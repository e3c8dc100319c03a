"""A model's own generation_config.json (sampling settings real models ship) never reaches caictl's sampling: the
engine, PPO's rollouts and eval iterations sample exactly what they record, and only the model's stop ids count."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import EXAMPLES, sharpened_copy

from caictl.data.reading import read_prompts
from caictl.engines import SamplingParams, load_engine
from caictl.engines.base import only_stop_ids
from caictl.rl.ppo import PPO
from caictl.stages import ppo

# Qwen2.5-Instruct ships repetition_penalty 1.05, top_k 20, top_p 0.8, temperature 0.7; these are stronger, so that
# on a random-weight model (a nearly flat distribution) any of them that leaked would change the tokens drawn.
MODEL_SAMPLING = {"do_sample": True, "repetition_penalty": 1.3, "top_k": 5, "top_p": 0.5, "temperature": 0.3}
TEXTS = ["\n\nHuman: Tell me about the sea and the ships on it.\n\nAssistant:",
         "\n\nHuman: hi\n\nAssistant:",
         "\n\nHuman: Write a list of ten fruits, then ten more.\n\nAssistant:"]


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory, tiny_model):
    """The tiny model with its logits scaled up 8x (conftest.sharpened_copy)."""
    return sharpened_copy(tiny_model, tmp_path_factory.mktemp("sharp") / "plain")


@pytest.fixture(scope="module")
def opinionated_model(plain_model):
    """plain_model, with sampling settings of its own in its generation_config.json."""
    folder = plain_model.parent / "opinionated"
    shutil.copytree(plain_model, folder)
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **MODEL_SAMPLING}))
    return folder


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_engine_samples_the_same_tokens_whatever_the_models_generation_config(
        plain_model, opinionated_model, temperature):
    params = SamplingParams(max_new_tokens=32, temperature=temperature, seed=5)
    keys = [f"k{i}" for i in range(len(TEXTS))]
    plain = load_engine("hf", str(plain_model), batch_size=4).complete(TEXTS, params, keys)
    opinionated = load_engine("hf", str(opinionated_model), batch_size=4)
    assert opinionated.lm.generation_config.repetition_penalty == 1.3  # the model keeps its config
    assert [g.text for g in opinionated.complete(TEXTS, params, keys)] == [g.text for g in plain]
    assert opinionated.lm.generation_config.top_k == 5  # restored after generating


def ppo_trainer(policy, pm, out, **options) -> PPO:
    return PPO(ppo.PPOConfig(prompts=str(EXAMPLES / "red-team.jsonl"), policy=str(policy), pm=str(pm), out=str(out),
                             steps=1, batch_size=4, minibatch_size=2, max_new_tokens=24, heldout=0, **options))


@pytest.mark.parametrize("lora", [False, True])
def test_ppo_rollouts_come_from_the_distribution_ppo_scores(tmp_path, plain_model, tiny_pm, opinionated_model, lora):
    prompts = read_prompts(EXAMPLES / "red-team.jsonl")[:4]
    rollouts = []
    for policy in (plain_model, opinionated_model):
        trainer = ppo_trainer(policy, tiny_pm, tmp_path / policy.name, lora=lora, temperature=0.9)
        torch.manual_seed(11)
        rollouts.append(trainer.rollout(prompts))
    assert torch.equal(rollouts[0]["ids"], rollouts[1]["ids"])
    # And the distribution is softmax(logits / temperature): each drawn token's probability under it, as
    # transformers' own sampler saw it, equals what forward() reads for the PPO ratio.
    plain = ppo_trainer(plain_model, tiny_pm, tmp_path / "scores", temperature=0.9)
    encoded = plain.tokenizer.pad({"input_ids": plain.encoder.encode_chats(
        [p.messages for p in prompts], add_generation_prompt=True)}, padding=True, return_tensors="pt")
    torch.manual_seed(11)
    with torch.no_grad(), only_stop_ids(plain.policy):
        output = plain.policy.generate(**encoded, max_new_tokens=24, do_sample=True, temperature=0.9, top_k=0,
                                       top_p=1.0, repetition_penalty=1.0, pad_token_id=plain.tokenizer.pad_token_id,
                                       eos_token_id=plain.stop_ids, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(output.sequences, rollouts[0]["ids"])
    start, mask = rollouts[0]["start"], rollouts[0]["mask"].bool()
    sampled = torch.log_softmax(torch.stack(output.scores, 1), -1)
    sampled = sampled.gather(-1, output.sequences[:, start:].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        scored, _, _ = plain.forward(rollouts[0]["ids"], rollouts[0]["attention"], start)
    assert torch.allclose(sampled[mask], scored[mask], atol=1e-5)


def test_eval_iterations_samples_the_same_responses_whatever_the_models_generation_config(
        plain_model, opinionated_model):
    from caictl.stages import eval_iterations

    config = eval_iterations.EvalIterationsConfig(run="unused", prompts="unused", reference=str(plain_model),
                                                  out="unused", max_new_tokens=24)
    prompts = read_prompts(EXAMPLES / "red-team.jsonl")[:4]
    reference = eval_iterations.load_model(plain_model)
    plain = eval_iterations.sample_with_kl(plain_model, reference, prompts, config)
    assert eval_iterations.sample_with_kl(opinionated_model, reference, prompts, config) == plain


def test_eval_iterations_loads_its_models_onto_the_gpu_when_there_is_one(monkeypatch, tiny_model):
    from caictl.stages import eval_iterations

    placed = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: placed.append(args) or self)
    model = eval_iterations.load_model(tiny_model)
    assert placed == [("cuda",)] and next(model.parameters()).dtype == torch.float32
