r"""eval iterations: the report of an iterated RL-CAI run (examples/iterated-pipeline.sh), one row a round.

    caictl eval iterations runs/demo-iterated \
        --prompts examples/held-out/harmless.jsonl \
        --reference runs/demo-iterated/models/sl-cai \
        -o runs/demo-iterated/iterations

Per finished round (RUN/iter-k/ with its `done` marker), from what the round wrote and from its policy sampled on
the held-out prompts:
- pm_heldout_accuracy: the round's PM on its own held-out split (train-pm's caictl.json);
- reward_before / reward_after: PPO's held-out reward under that PM, before and after the round;
- kl_from_reference: KL(policy || the SL-CAI model) in nats per response, estimated on responses sampled from the
  round's policy: at each of their steps the exact KL between the two models' next-token distributions, summed
  over the response and averaged over responses (never negative, unlike the sampled log-ratio);
- refusal_rate, boilerplate_rate: of those responses (caictl.evaluation.textstats, as `eval compare` counts them);
- previous_pm_disagreement: the share of the round's new labelled pairs on which the previous round's PM prefers
  the response the new label does not (pairs labelled 0.5 left out); none for the first round.
Writes summary.json, report.md and iterations.png into -o.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from caictl.data.reading import read_prompts, read_rows
from caictl.engines.base import NO_SAMPLING_FILTERS, only_stop_ids, stop_ids
from caictl.errors import UsageError
from caictl.evaluation.markdown import random_weights_warning, table
from caictl.evaluation.textstats import response_stats
from caictl.models import kind as model_kind
from caictl.options import INPUT_OUTPUT, MODEL_ENGINE, SAMPLING, common, option
from caictl.ui import log, summary_table

ROUND = re.compile(r"iter-(\d+)$")


@dataclass
class EvalIterationsConfig:
    run: str = option(help="An iterated run's folder (examples/iterated-pipeline.sh: runs/RUN).", panel=INPUT_OUTPUT,
                      argument=True)
    prompts: str = option(help="Held-out prompts each round's policy answers.", panel=INPUT_OUTPUT)
    reference: str = option(help="The model KL is measured from: the SL-CAI model.", panel=MODEL_ENGINE)
    out: str = option(help="Output folder.", panel=INPUT_OUTPUT, short="-o")
    max_new_tokens: int = option(48, "Tokens per sampled response.", SAMPLING, settings="stage")
    batch_size: int = option(16, "Prompts per forward pass.", MODEL_ENGINE, settings="stage")
    limit: int | None = option(32, "Held-out prompts used.", INPUT_OUTPUT)
    seed: int = common("seed", 0)


def run(config: EvalIterationsConfig) -> dict:
    rounds = finished_rounds(Path(config.run))
    if not rounds:
        raise UsageError(f"{config.run}: no finished rounds (iter-K/ with a `done` marker); run "
                         "examples/iterated-pipeline.sh first")
    prompts = read_prompts(config.prompts)[:config.limit]
    model_kind.require(config.reference, "--reference")
    reference = load_model(config.reference)  # once: every round's KL is from the same model
    rows, previous_pm = [], None
    for k, folder in rounds:
        log(f"round {k}: sampling {len(prompts)} held-out prompts from {folder / 'policy'}")
        responses, kl = sample_with_kl(folder / "policy", reference, prompts, config)
        stats = response_stats(responses)
        ppo_metrics = _metrics(folder / "policy")
        rows.append({
            "round": k,
            "pm_heldout_accuracy": _metrics(folder / "pm").get("eval", {}).get("held_out", {}).get("accuracy"),
            "reward_before": ppo_metrics.get("heldout_reward_before"),
            "reward_after": ppo_metrics.get("heldout_reward_after"),
            "kl_from_reference": round(kl, 4),
            "refusal_rate": stats["refusal_rate"],
            "boilerplate_rate": stats["boilerplate_rate"],
            "previous_pm_disagreement": (disagreement(previous_pm, folder / "prefs.jsonl")
                                         if previous_pm else None),
        })
        previous_pm = folder / "pm"
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"stage": "eval iterations", "run": config.run, "reference": config.reference,
               "prompts": config.prompts, "held_out_prompts": len(prompts), "rounds": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(render(summary))
    plot(rows, out / "iterations.png")
    summary_table("eval iterations",
                  [(f"round {r['round']}", _line(r)) for r in rows] + [("report", out / "report.md")])
    return summary


def finished_rounds(run: Path) -> list[tuple[int, Path]]:
    rounds = [(int(m.group(1)), p) for p in run.glob("iter-*") if (m := ROUND.search(p.name)) and (p / "done").exists()]
    return sorted(rounds)


def load_model(path):
    """A causal LM folder, in eval mode, on the GPU when there is one. In fp32 there too: the KL sums many small
    differences between two close models, which bf16 logits would blur."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def sample_with_kl(policy: Path, reference, prompts: list, config: EvalIterationsConfig) -> tuple[list, float]:
    """Responses sampled from the policy folder (temperature 1, seeded) and KL(policy || reference) per response:
    the mean over them of the summed per-step KL between the two models' next-token distributions. reference: a
    loaded model (load_model), where every tensor of the computation is put."""
    import torch
    from transformers import AutoTokenizer

    from caictl.data.control_text import ContentEncoder

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoder = ContentEncoder(tokenizer)
    models = [load_model(policy), reference]
    device = next(reference.parameters()).device
    stops = stop_ids(tokenizer, models[0].generation_config)
    responses, ratios = [], []
    for first in range(0, len(prompts), config.batch_size):
        batch = prompts[first:first + config.batch_size]
        ids = encoder.encode_chats([p.messages for p in batch], add_generation_prompt=True)
        encoded = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(device)
        # Sampled from softmax(logits) itself, as the KL below assumes (only_stop_ids: nothing of the model's
        # generation_config but its stop ids).
        with torch.no_grad(), only_stop_ids(models[0]):
            output = models[0].generate(**encoded, max_new_tokens=config.max_new_tokens, do_sample=True,
                                        temperature=1.0, **NO_SAMPLING_FILTERS,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
        start = encoded["input_ids"].shape[1]
        response = output[:, start:]
        is_stop = torch.isin(response, torch.tensor(stops, device=device))
        # A response runs up to and including its first stop token; what follows is padding.
        ends = torch.where(is_stop.any(1), is_stop.int().argmax(1), response.shape[1])
        mask = (torch.arange(response.shape[1], device=device).unsqueeze(0) <= ends.unsqueeze(1)).float()
        attention = torch.cat([encoded["attention_mask"], mask.long()], dim=1)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        logprobs = []
        for model in models:
            with torch.no_grad():  # logits for the response's steps alone: the prompt's would be vocabulary-sized
                logits = model(input_ids=output, attention_mask=attention, position_ids=positions,
                               logits_to_keep=output.shape[1] - start + 1).logits
            logprobs.append(torch.log_softmax(logits[:, :-1].float(), -1))
        # KL between the two next-token distributions over the whole vocabulary at each step of the response.
        steps = (logprobs[0].exp() * (logprobs[0] - logprobs[1])).sum(-1)
        ratios += (steps * mask).sum(1).tolist()
        responses += [tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(response, mask)]
    return responses, sum(ratios) / len(ratios)


def disagreement(pm: Path, prefs: Path) -> float | None:
    """The share of labelled pairs on which `pm` prefers the response the label does not (label 0.5 left out)."""
    from caictl.models.pm import Scorer, comparison_of

    comparisons = [comparison_of(row.data) for row in read_rows(str(prefs))]
    decided = [c for c in comparisons if c.p != 0.5]
    if not decided:
        return None
    scores = Scorer(pm).score([t for c in decided for t in (c.chosen, c.rejected)])
    differ = sum((chosen > rejected) != (c.p > 0.5) for c, chosen, rejected in zip(decided, scores[::2], scores[1::2]))
    return round(differ / len(decided), 4)


def render(summary: dict) -> str:
    columns = [("round", "round"), ("pm_heldout_accuracy", "PM held-out accuracy"), ("reward_before", "reward before"),
               ("reward_after", "reward after"), ("kl_from_reference", "KL from SL-CAI (nats)"),
               ("refusal_rate", "refusal"), ("boilerplate_rate", "boilerplate"),
               ("previous_pm_disagreement", "previous PM disagrees")]
    lines = [f"# Iterated RL-CAI: `{summary['run']}`", "", *random_weights_warning([summary["reference"]]),
             f"{len(summary['rounds'])} round(s); each round's policy sampled on {summary['held_out_prompts']} "
             f"held-out prompts from `{summary['prompts']}`; KL from `{summary['reference']}`.", ""]
    lines += table([title for _, title in columns],
                   [["" if row[key] is None else row[key] for key, _ in columns] for row in summary["rounds"]])
    return "\n".join(lines + ["![rounds](iterations.png)", ""])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for key, label in (("reward_before", "reward before"), ("reward_after", "reward after")):
        axes[0].plot(rounds, [r[key] for r in rows], marker="o", label=label)
    axes[0].set_title("held-out reward (the round's PM)")
    axes[0].legend()
    axes[1].plot(rounds, [r["kl_from_reference"] for r in rows], marker="o")
    axes[1].set_title("KL from SL-CAI (nats per response)")
    for key in ("refusal_rate", "boilerplate_rate", "previous_pm_disagreement"):
        axes[2].plot(rounds, [r[key] for r in rows], marker="o", label=key.replace("_", " "))
    axes[2].set_title("rates")
    axes[2].legend()
    for axis in axes:
        axis.set_xlabel("round")
        axis.set_xticks(rounds)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _metrics(folder: Path) -> dict:
    path = folder / "caictl.json"
    return json.loads(path.read_text()).get("metrics", {}) if path.exists() else {}


def _line(row: dict) -> str:
    return (f"PM acc {row['pm_heldout_accuracy']}, reward {row['reward_before']} -> {row['reward_after']}, "
            f"KL {row['kl_from_reference']}, refusal {row['refusal_rate']}, boilerplate {row['boilerplate_rate']}, "
            f"previous PM disagrees {row['previous_pm_disagreement']}")
