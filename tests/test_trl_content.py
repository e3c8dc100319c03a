"""dpo and ppo --algo rloo|grpo on TRL's trainers read message content as text, token for token, as sft, caictl's PPO
and the engines do: a "<|eot_id|>" written in a prompt or a response is the text "<|eot_id|>", and only the chat
template's own markup becomes control tokens. The rows are read where the stage hands them to the model: the batch
TRL's DPO collator builds from the trainer's dataset, and the prompt ids TRL's GRPO/RLOO pass to generate().
Also: rloo/grpo rollouts sample from the distribution their losses score, whatever the model's generation_config
says; and the TRL methods caictl replaces keep the signatures it was written against.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import sharpened_copy

from caictl.data import control_text as tokens
from caictl.models import chat_training
from caictl.rl import trl as rl_trl
from caictl.stages import dpo, ppo

FAMILIES = ("qwen2.5", "llama3", "phi3")
CORPUS = json.loads((Path(__file__).parent / "data" / "control_text_corpus.json").read_text())
PLAIN = "An ordinary sentence."


class Built(Exception):
    """Raised once a stage has built its TRL trainer, carrying it: the trainer as the stage would train it."""


def built_trainer(module, call):
    """The trainer `call()` builds through `module` (dpo, or caictl.rl.trl), stopped before it trains; rloo/grpo get
    no reward model (these tests never score a rollout)."""

    def stop(trainer, _name):
        raise Built(trainer)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "trainer_progress", stop)
        patch.setattr(rl_trl, "reward_model", lambda config: SimpleNamespace(cuts=lambda: None))
        with pytest.raises(Built) as caught:
            call()
    return caught.value.args[0]


def controls(tokenizer, ids, stop_ids=()) -> list[int]:
    """The control ids in a row, in order: the tokens a chat template writes and generation stops on."""
    control = {tokenizer.convert_tokens_to_ids(t) for t in tokens.control_tokens(tokenizer, stop_ids)}
    return [i for i in ids if i in control]


# dpo ----------------------------------------------------------------------------------------------------------

def pair(text: str) -> dict:
    return {"prompt": [{"role": "user", "content": f"Quote this: {text}"}],
            "chosen": [{"role": "assistant", "content": f"I won't. {text}"}],
            "rejected": [{"role": "assistant", "content": f"{text} Done."}]}


@pytest.fixture(scope="module")
def dpo_batches(family_model, tmp_path_factory):
    """Per family: (tokenizer, training template, pairs, [(chosen row, rejected row)]), each row the (ids, trained
    ids) of one sequence of the batch TRL's collator builds from the trainer's dataset, as DPO trains on it."""
    cache = {}

    def _batches(name: str):
        if name not in cache:
            model = str(family_model(name))
            pairs = [pair(PLAIN)] + [pair(entry["text"]) for entry in CORPUS]
            config = dpo.DPOConfig(prefs=[], out=str(tmp_path_factory.mktemp("dpo") / name), model=model)
            trainer = built_trainer(dpo, lambda: dpo.prepare(config, model, pairs))
            batch = trainer.data_collator(list(trainer.train_dataset))
            rows = []
            for ids, attention, trained in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
                rows.append((ids[attention.bool()].tolist(), ids[trained.bool()].tolist()))
            tokenizer = trainer.processing_class
            template, _ = chat_training.training_template(tokenizer, model, None)
            cache[name] = tokenizer, template, pairs, list(zip(rows[:len(pairs)], rows[len(pairs):]))
        return cache[name]

    return _batches


@pytest.mark.parametrize("name", FAMILIES)
def test_dpo_trains_on_content_as_text(name, dpo_batches):
    tokenizer, template, pairs, rows = dpo_batches(name)
    assert len(rows) == len(CORPUS) + 1  # no pair dropped
    encoder = tokens.ContentEncoder(tokenizer)
    plain = rows[0]
    failures = []
    for entry, example, sides in zip([{"name": "plain", "text": PLAIN}] + CORPUS, pairs, rows):
        for side, (ids, trained), (plain_ids, plain_trained) in zip(("chosen", "rejected"), sides, plain):
            # Control ids: the template's markup only, the same as around plain content.
            if controls(tokenizer, ids) != controls(tokenizer, plain_ids):
                failures.append(f"{entry['name']} {side}: {tokenizer.convert_ids_to_tokens(ids)}")
                continue
            # The ids are ContentEncoder's through the training template, up to the answer's end-of-turn token (what
            # the template writes after it is whitespace, or Phi-3.5's second <|end|>) ...
            expected = encoder.encode_chat(example["prompt"] + example[side], chat_template=template)["input_ids"]
            assert ids == expected[:len(ids)], entry["name"]
            assert not tokenizer.decode(expected[len(ids):], skip_special_tokens=True).strip(), entry["name"]
            # ... the prompt is the one the model answers at inference ...
            prompt = encoder.encode_chats([example["prompt"]], add_generation_prompt=True)[0]
            assert ids[:len(prompt)] == prompt and ids[len(prompt):] == trained, entry["name"]
            # ... and the trained ids are those sft trains on in that conversation: the answer and its end of turn.
            (row,) = chat_training.tokenize([example["prompt"] + example[side]], tokenizer, template, {})
            assert trained == [i for i in row["labels"] if i != -100], entry["name"]
    assert failures == []
    # Read back, an answer is its text and the end-of-turn token.
    assert tokenizer.decode(plain[0][1]) == f"I won't. {PLAIN}" + tokenizer.convert_ids_to_tokens(plain[0][1][-1])
    assert controls(tokenizer, plain[0][1]) == plain[0][1][-1:]


# rloo, grpo ---------------------------------------------------------------------------------------------------

def trl_trainer(policy, out, algo: str, prompts: list[list[dict]], **options):
    """The trainer `caictl ppo --algo rloo|grpo` builds on these prompts (no reference model: --kl-coef 0)."""
    config = ppo.PPOConfig(prompts=None, policy=str(policy), pm=None, out=str(out), algo=algo, batch_size=4,
                           num_generations=2, kl_coef=0.0, **{"max_new_tokens": 2, **options})
    return built_trainer(rl_trl, lambda: rl_trl.run_trl(config, [SimpleNamespace(messages=p) for p in prompts], []))


def generated(trainer, prompts: list[list[dict]]):
    """TRL's own rollout step on the prompts: (the unpadded prompt ids it passed to generate(), completion ids)."""
    seen = []
    model = trainer.model
    generate = model.generate

    def recording(*args, **kwargs):
        seen.append((kwargs["input_ids"], kwargs["attention_mask"]))
        return generate(*args, **kwargs)

    model.generate = recording
    try:
        _, completions = trainer._generate(prompts)[:2]
    finally:
        del model.generate
    ((ids, attention),) = seen
    return [row[mask.bool()].tolist() for row, mask in zip(ids, attention)], completions


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_rloo_and_grpo_prompts_are_content_as_text(name, algo, family_model, tmp_path):
    prompts = [[{"role": "user", "content": PLAIN}]] + [[{"role": "user", "content": e["text"]}] for e in CORPUS]
    trainer = trl_trainer(family_model(name), tmp_path, algo, prompts)
    rows, _ = generated(trainer, prompts)
    tokenizer, stop = trainer.processing_class, trainer.eos_token_ids
    assert rows == tokens.ContentEncoder(tokenizer, stop).encode_chats(prompts, add_generation_prompt=True)
    wrong = [entry["name"] for entry, ids in zip(CORPUS, rows[1:])
             if controls(tokenizer, ids, stop) != controls(tokenizer, rows[0], stop)]
    assert wrong == []
    # Normal content gives the template's own ids, as TRL would tokenize it.
    assert rows[0] == tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]


# What the model's generation_config would change, were it read: on a random model's nearly flat distribution a
# quarter of the vocabulary suppressed, or min_p, changes the tokens drawn. top_k and repetition_penalty TRL sets
# itself; they are here as real models ship them.
MODEL_SAMPLING = {"do_sample": True, "min_p": 0.2, "top_k": 3, "repetition_penalty": 1.3, "no_repeat_ngram_size": 1}


@pytest.fixture(scope="module")
def sampling_models(tmp_path_factory, tiny_model):
    """(plain, opinionated): the tiny model with sharper logits (conftest.sharpened_copy), and a copy whose
    generation_config.json sets sampling options of its own."""
    from transformers import AutoConfig, AutoTokenizer

    plain = sharpened_copy(tiny_model, tmp_path_factory.mktemp("sampling") / "plain")
    opinionated = plain.parent / "opinionated"
    shutil.copytree(plain, opinionated)
    path = opinionated / "generation_config.json"
    special = set(AutoTokenizer.from_pretrained(plain).all_special_ids)
    suppressed = [i for i in range(AutoConfig.from_pretrained(plain).vocab_size) if i % 4 == 1 and i not in special]
    path.write_text(json.dumps({**json.loads(path.read_text()), **MODEL_SAMPLING, "suppress_tokens": suppressed}))
    return plain, opinionated


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_rloo_and_grpo_rollouts_ignore_the_model_s_generation_config(algo, sampling_models, tmp_path):
    prompts = [[{"role": "user", "content": f"Tell me about {thing}."}] for thing in ("the sea", "ships", "rain")] * 2
    drawn = []
    for policy in sampling_models:
        trainer = trl_trainer(policy, tmp_path / policy.name, algo, prompts, max_new_tokens=12)
        torch.manual_seed(3)
        drawn.append(generated(trainer, prompts)[1])
    assert drawn[0] == drawn[1]
    kept = trainer.model.generation_config  # the opinionated model keeps its own config, once it has generated
    assert kept.min_p == 0.2 and len(kept.suppress_tokens) > 10


# The TRL methods caictl replaces ------------------------------------------------------------------------------

def test_the_trl_methods_caictl_replaces_are_still_there_and_called():
    """dpo replaces DPOTrainer._prepare_dataset; rloo/grpo replace _tokenize_prompts and wrap _generate_single_turn.
    A TRL release that renames them, changes what they take, or stops calling them would silently undo that: pin
    trl to the tested range and update caictl.stages.dpo.pretokenized and caictl.rl.trl.content_as_data first."""
    from trl import DPOTrainer, GRPOTrainer, RLOOTrainer

    def parameters(method) -> list[str]:
        return list(inspect.signature(method).parameters)

    assert parameters(DPOTrainer._prepare_dataset) == ["self", "dataset", "processing_class", "args", "dataset_name"]
    assert "self._prepare_dataset(train_dataset, processing_class, args," in inspect.getsource(DPOTrainer.__init__)
    assert parameters(dpo.pretokenized(DPOTrainer)._prepare_dataset) == parameters(DPOTrainer._prepare_dataset)
    single_turn = {RLOOTrainer: ["self", "prompt_ids", "images", "multimodal_fields"],
                   GRPOTrainer: ["self", "prompt_ids", "images", "multimodal_fields", "num_generations",
                                 "has_tool_images"]}
    for trainer, expected in single_turn.items():
        assert parameters(trainer._tokenize_prompts) == ["self", "prompts"], trainer.__name__
        assert parameters(trainer._generate_single_turn) == expected, trainer.__name__
        source = inspect.getsource(trainer._generate)
        # Prompt ids, images and multimodal fields come from _tokenize_prompts and go to _generate_single_turn.
        assert "prompt_ids, images, multimodal_fields = self._tokenize_prompts(prompts)" in source, trainer.__name__
        assert "self._generate_single_turn(" in source, trainer.__name__
        assert "self.eos_token_ids =" in inspect.getsource(trainer.__init__), trainer.__name__
        ours = rl_trl.content_as_data(trainer)
        assert ours.__mro__[1] is trainer and parameters(ours._tokenize_prompts) == ["self", "prompts"]
