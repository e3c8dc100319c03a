"""Every stage on every real family, through the hf engine, as one short chain per family: revise -> sample ->
label (soft with both orders and few-shot, hard, chain-of-thought) -> train-pm -> score -> ppo -> dpo -> eval
mc, pm and compare. sft (full and LoRA) runs per family in test_sft_families.py.

The weights are random, so the checks are what a family can break: every stage runs to the end on the family's
tokenizer and template; generated text carries none of the template's markup (generation stops at the family's
end-of-turn ids and decodes without control tokens); label's p is the mean of both orders' probabilities; the
folders the trainers write load with plain transformers and keep the family's chat template.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import EXAMPLES, read_jsonl, write_jsonl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from caictl.stages import dpo, eval_pm, label, ppo, revise, sample, score, train_pm
from caictl.stages import eval_compare as compare
from caictl.stages import eval_mc as eval
from caictl.stages import init_model as tiny

MODEL_FAMILIES = ("qwen2.5", "llama3", "phi3")
# The control text each family's template writes; a generation that decodes to any of it leaked markup.
MARKUP = ("<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
          "<|eot_id|>", "<|end_of_text|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>")
TOKENS = 8  # new tokens per generation: enough to see markup leak, short enough for the suite
PROMPTS = 2  # red-team prompts in each chain (ppo needs two to train on)


class Chain:
    """One family's artifacts, each made on first use from the ones before it, shared by the tests below."""

    def __init__(self, name: str, policy: Path, folder: Path):
        self.name, self.policy, self.folder = name, policy, folder
        self.prompts = write_jsonl(folder / "prompts.jsonl", read_jsonl(EXAMPLES / "red-team.jsonl")[:PROMPTS])
        self.made: dict[str, object] = {}

    def once(self, key, make):
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]

    def revisions(self) -> list[dict]:
        out = self.folder / "revisions.jsonl"
        return self.once("revise", lambda: (revise.run(revise.ReviseConfig(
            prompts=str(self.prompts), out=str(out), model=str(self.policy), rounds=1, shots=1,
            max_new_tokens=TOKENS, batch_size=4)), read_jsonl(out))[1])

    def pairs(self) -> Path:
        out = self.folder / "pairs.jsonl"
        return self.once("sample", lambda: (sample.run(sample.SampleConfig(
            prompts=str(self.prompts), out=str(out), model=str(self.policy), n=2, max_new_tokens=TOKENS,
            batch_size=4)), out)[1])

    def labels(self, kind: str) -> list[dict]:
        options = {"soft": dict(few_shot=True), "hard": dict(hard=True), "cot": dict(cot=True, max_new_tokens=TOKENS)}
        out = self.folder / f"prefs-{kind}.jsonl"
        return self.once(f"label-{kind}", lambda: (label.run(label.LabelConfig(
            pairs=str(self.pairs()), out=str(out), model=str(self.policy), batch_size=4, **options[kind])),
            read_jsonl(out))[1])

    def pm(self) -> Path:
        def make():
            backbone = tiny.run(tiny.InitModelConfig(out=self.folder / "pm-base", preset="tiny", task="seq-cls",
                                                     family=self.name))
            self.labels("soft")
            train_pm.run(train_pm.TrainPMConfig(prefs=[str(self.folder / "prefs-soft.jsonl")],
                                                out=str(self.folder / "pm"), model=str(backbone), batch_size=2,
                                                max_length=256))
            return self.folder / "pm"
        return self.once("pm", make)

    def rl_policy(self) -> Path:
        out = self.folder / "rl"
        return self.once("ppo", lambda: (ppo.run(ppo.PPOConfig(
            prompts=str(self.prompts), policy=str(self.policy), pm=str(self.pm()), out=str(out), steps=1,
            batch_size=2, minibatch_size=2, ppo_epochs=1, max_new_tokens=TOKENS, heldout=0)), out)[1])


@pytest.fixture(scope="module")
def chain(family_model, tmp_path_factory):
    chains = {}

    def _chain(name: str) -> Chain:
        if name not in chains:
            chains[name] = Chain(name, family_model(name), tmp_path_factory.mktemp(f"chain-{name}"))
        return chains[name]
    return _chain


def assert_no_markup(texts: list[str]):
    leaked = [t for t in texts if any(m in t for m in MARKUP)]
    assert not leaked, f"generated text carries template markup: {leaked[:3]}"


def assert_keeps_the_family_template(folder: Path, policy: Path):
    assert AutoTokenizer.from_pretrained(folder).chat_template == AutoTokenizer.from_pretrained(policy).chat_template


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_revise(name, chain):
    records = chain(name).revisions()
    assert len(records) == PROMPTS and all(len(r["steps"]) == 1 and r["steps"][0]["principle"] for r in records)
    assert_no_markup([r["initial_response"] for r in records]
                     + [text for r in records for s in r["steps"] for text in (s["critique"], s["revision"])])


@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_sample(name, chain):
    rows = read_jsonl(chain(name).pairs())
    assert len(rows) == PROMPTS and all(len(r["responses"]) == 2 for r in rows)
    assert_no_markup([response for r in rows for response in r["responses"]])


@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_label_soft_both_orders_with_few_shot(name, chain):
    records = chain(name).labels("soft")
    assert len(records) == PROMPTS
    for record in records:
        (vote,) = record["votes"]
        # Both orders read, each P(first response preferred) as a probability; p is their mean.
        assert 0 < vote["p_ab"] < 1 and 0 < vote["p_ba"] < 1
        assert vote["p"] == pytest.approx((vote["p_ab"] + vote["p_ba"]) / 2, abs=1e-9)
        assert record["p_chosen"] >= 0.5


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_label_hard_and_chain_of_thought(name, chain):
    assert {r["p_chosen"] for r in chain(name).labels("hard")} == {1.0}
    lo, hi = label.LabelConfig(cot=True).effective_clamp
    for record in chain(name).labels("cot"):
        assert lo - 1e-9 <= record["votes"][0]["p"] <= hi + 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_train_pm_and_score(name, chain):
    pm = chain(name).pm()
    model = AutoModelForSequenceClassification.from_pretrained(pm)
    assert model.config.num_labels == 1
    out = chain(name).folder / "pairs.scored.jsonl"
    score.run(score.ScoreConfig(pm=str(pm), file=str(chain(name).pairs()), out=str(out)))
    rewards = [reward for row in read_jsonl(out) for reward in row["rewards"]]
    assert len(rewards) == 2 * PROMPTS and all(math.isfinite(r) for r in rewards) and len(set(rewards)) > 1


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_ppo(name, chain):
    folder = chain(name).rl_policy()
    AutoModelForCausalLM.from_pretrained(folder)
    assert_keeps_the_family_template(folder, chain(name).policy)
    assert json.loads((folder / "caictl.json").read_text())["stage"] == "ppo"


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_dpo(name, chain):
    out = chain(name).folder / "dpo"
    chain(name).labels("soft")
    dpo.run(dpo.DPOConfig(prefs=[str(chain(name).folder / "prefs-soft.jsonl")], out=str(out),
                          model=str(chain(name).policy), max_steps=1, batch_size=2, max_length=256, min_p_chosen=0.5))
    AutoModelForCausalLM.from_pretrained(out)
    assert_keeps_the_family_template(out, chain(name).policy)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_eval_mc_pm_and_compare(name, chain):
    c = chain(name)
    mc = write_jsonl(c.folder / "mc.jsonl", [{"prompt": f"Which is safer, option {i}? The answer is:",
                                              "corrects": [" (A)"], "incorrects": [" (B)"]} for i in range(3)])
    mc_summary = eval.run(eval.EvalMCConfig(files=[str(mc)], out=str(c.folder / "eval-mc"), model=str(c.policy)))
    assert mc_summary["files"][str(mc)]["questions"] == 3
    c.labels("soft")
    pm_summary = eval_pm.run(eval_pm.EvalPMConfig(files=[str(c.folder / "prefs-soft.jsonl")],
                                               out=str(c.folder / "eval-pm"), pm=str(c.pm())))
    assert pm_summary["files"][str(c.folder / "prefs-soft.jsonl")]
    held_out = write_jsonl(c.folder / "held-out.jsonl", read_jsonl(EXAMPLES / "held-out" / "harmless.jsonl")[:1])
    summary = compare.run(compare.EvalCompareConfig(
        prompts=[str(held_out)], out=str(c.folder / "eval"), models=[f"base={c.policy}", f"rl={c.rl_policy()}"],
        pm=str(c.pm()), judge=str(c.policy), max_new_tokens=TOKENS, batch_size=4))
    assert list(summary["models"]) == ["base", "rl"] and set(summary["ratings"]) == {"pm", "judge"}
    assert_no_markup([row["response"] for row in read_jsonl(c.folder / "eval" / "responses.jsonl")])


# README's compatibility table, checked against the tests that run each cell ------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def covered() -> dict[tuple[str, str], set[str]]:
    """(family, stage) -> engines, read off the tests: each stage's test and the families it is parametrized on."""
    import test_engine_openai_families as served
    import test_sft_families as sft_families

    tests = {("revise", "hf"): test_revise, ("sample", "hf"): test_sample,
             ("label", "hf"): test_label_soft_both_orders_with_few_shot,
             ("sft", "hf"): sft_families.test_sft_trains_each_family_and_gives_its_template_back,
             ("train-pm", "hf"): test_train_pm_and_score, ("score", "hf"): test_train_pm_and_score,
             ("ppo", "hf"): test_ppo, ("dpo", "hf"): test_dpo, ("eval mc", "hf"): test_eval_mc_pm_and_compare,
             ("eval pm", "hf"): test_eval_mc_pm_and_compare, ("eval compare", "hf"): test_eval_mc_pm_and_compare}
    tests |= {(stage, "openai"): served.test_revise_sample_and_label_run_through_the_server
              for stage in ("revise", "sample", "label")}
    cells: dict[tuple[str, str], set[str]] = {}
    for (stage, engine), test in tests.items():
        for mark in getattr(test, "pytestmark", []):
            if mark.name == "parametrize" and mark.args[0].split(",")[0].strip() == "name":
                families = {value[0] if isinstance(value, tuple) else value for value in mark.args[1]}
                break
        else:
            families = {served.FAMILY}  # a module about one family's server
        for family in families:
            cells.setdefault((family, stage), set()).add(engine)
    return cells


def test_the_readme_compatibility_table_is_what_the_tests_run():
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("<!-- compatibility table: tests/test_families_stages.py checks it -->")
    header = [cell.strip() for cell in lines[start + 1].strip("|").split("|")]
    table = {}
    for line in lines[start + 3:]:
        if not line.startswith("|"):
            break
        family, *cells = [cell.strip() for cell in line.strip("|").split("|")]
        for stage, cell in zip(header[1:], cells):
            engines = {e.strip() for e in cell.split(",") if e.strip() and e.strip() != "-"}
            if engines:
                table[(family, stage)] = engines
    assert table == covered()
