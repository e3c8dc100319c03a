"""eval report: one report.md for a whole run, from the artifacts the stages left behind.

    caictl eval report runs/demo        # writes runs/demo/report/report.md

It reads what it finds under the given folders (and files), by content, not by name:
- model folders (a `caictl.json`): each stage's figures: sft loss, train-pm held-out accuracy and ECE, ppo
  reward and KL, with the plots those stages drew;
- revise records: which principles drove revisions, how often a revision changed the response, and by how
  much; the flags raised;
- label records: per principle, mean confidence, position consistency (both orders agree) and first-slot pull;
- `eval compare` folders: the Elo ratings and signs of Goodharting, linked to their full report;
- `eval mc` and `eval pm` folders: accuracy and calibration per file, linked to their full report;
- `eval labeler` folders: the feedback model against people, per file and mode: accuracy, ECE, position and
  length bias, linked to their full report.
Output: report.md, summary.json and principles.png in the output folder.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from caictl.data.reading import read_rows
from caictl.data.records import UNUSABLE_REVISION_FLAGS
from caictl.errors import CaictlError, UsageError
from caictl.evaluation.markdown import number, random_weights_warning, table
from caictl.feedback.judge import vote_statistics
from caictl.options import INPUT_OUTPUT, option
from caictl.ui import summary_table

SCAN_DEPTH = 3
STAGE_ORDER = ["init-model", "revise", "sft", "sample", "label", "train-pm", "ppo", "dpo", "eval compare"]


@dataclass
class EvalReportConfig:
    paths: list[str] = option(help="Run folders (scanned) or artifact files.", panel=INPUT_OUTPUT, argument=True)
    out: str | None = option(None, "Output folder; unset: FIRST_FOLDER/report.", INPUT_OUTPUT, short="-o")


@dataclass
class Found:
    models: list[tuple[Path, dict]]  # model folder, its caictl.json
    revisions: list[tuple[Path, list[dict]]]
    labels: list[tuple[Path, list[dict]]]
    compares: list[tuple[Path, dict]]  # eval compare folder, its summary.json
    scores: list[tuple[Path, dict]]  # eval mc or eval pm folder, its summary.json
    labelers: list[tuple[Path, dict]]  # eval labeler folder, its summary.json


def run(config: EvalReportConfig) -> dict:
    missing = [p for p in config.paths if not Path(p).exists()]
    if missing or not config.paths:
        raise UsageError(f"{', '.join(missing) or 'no run folder given'}: no such file or folder")
    first_folder = next((Path(p) for p in config.paths if Path(p).is_dir()), Path("."))
    out = Path(config.out) if config.out else first_folder / "report"
    found = find(config.paths, exclude=out)
    if not (found.models or found.revisions or found.labels or found.compares or found.scores or found.labelers):
        raise UsageError(f"{', '.join(config.paths)}: no caictl artifacts found (model folders with caictl.json, "
                         "revise or label records, eval compare, mc, pm or labeler folders)")
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "stage": "eval report",
        "stages": [stage_figures(path, meta) for path, meta in sorted(found.models, key=_stage_rank)],
        "revisions": {str(path): revision_statistics(rows) for path, rows in found.revisions},
        "labels": {str(path): dict(zip(("per_principle", "overall"), vote_statistics(rows)))
                   for path, rows in found.labels},
        "compare": {str(path): {k: s[k] for k in ("models", "sets", "ratings", "per_model")}
                    for path, s in found.compares},
        "scores": {str(path): s for path, s in found.scores},
        "labelers": {str(path): s for path, s in found.labelers},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_principles(summary, out / "principles.png")
    (out / "report.md").write_text(render(summary, found, out))
    summary_table("eval report", [("model folders", len(found.models)), ("revise files", len(found.revisions)),
                                  ("label files", len(found.labels)), ("eval compare folders", len(found.compares)),
                                  ("eval mc / pm folders", len(found.scores)),
                                  ("eval labeler folders", len(found.labelers)),
                                  ("report", out / "report.md")])
    return {**summary, "report": str(out / "report.md")}


# Finding artifacts ----------------------------------------------------------------------------------------


def find(paths: list[str], exclude: Path) -> Found:
    found = Found([], [], [], [], [], [])
    for path in paths:
        _visit(Path(path), found, exclude.resolve(), SCAN_DEPTH)
    return found


def _visit(path: Path, found: Found, exclude: Path, depth: int) -> None:
    if path.is_file():
        kind = _record_kind(path)
        if kind:
            getattr(found, kind).append((path, [row.data for row in read_rows(path)]))
        return
    if path.resolve() == exclude:
        return
    if (path / "caictl.json").is_file():
        found.models.append((path, json.loads((path / "caictl.json").read_text())))
        return
    summary = path / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        if data.get("stage") == "eval compare":
            found.compares.append((path, data))
            return
        if data.get("stage") == "eval labeler":
            found.labelers.append((path, data))
            return
        if _score_stage(data):
            found.scores.append((path, {**data, "stage": _score_stage(data)}))
            return
    if depth > 0:
        for child in sorted(path.iterdir()):
            if child.is_dir() or child.name.endswith((".jsonl", ".jsonl.gz")):
                _visit(child, found, exclude, depth - 1)


def _record_kind(path: Path) -> str | None:
    """revisions or labels, from the file's first record; None for any other file."""
    try:
        first = next(iter(read_rows(path))).data
    except (CaictlError, StopIteration):  # not JSONL, or empty: not ours to report on
        return None
    if not isinstance(first, dict):
        return None
    if "steps" in first and "initial_response" in first:
        return "revisions"
    if "votes" in first and "p_chosen" in first:
        return "labels"
    return None


def _score_stage(summary: dict) -> str | None:
    """eval mc or eval pm, from a summary.json; folders written before summaries named their stage are known by
    their fields."""
    if summary.get("stage") in ("eval mc", "eval pm"):
        return summary["stage"]
    if "stage" not in summary and isinstance(summary.get("files"), dict):
        return "eval pm" if "pm" in summary else "eval mc" if "model" in summary else None
    return None


def _stage_rank(item: tuple[Path, dict]) -> tuple[int, str]:
    stage = item[1].get("stage", "")
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), str(item[0]))


# Figures ------------------------------------------------------------------------------------------------


def stage_figures(path: Path, meta: dict) -> dict:
    """A model folder's stage and the few numbers that say how its training went."""
    stage, metrics = meta.get("stage", "?"), meta.get("metrics", {})
    figures: dict = {}
    if stage == "init-model":
        figures = {"preset": meta.get("preset"), "task": meta.get("task"), "parameters": meta.get("parameters"),
                   "random_weights": meta.get("random_weights", False)}
    elif stage in ("sft", "dpo"):
        figures = {k: metrics.get(k) for k in ("examples", "steps", "train_loss_first", "train_loss_last",
                                              "seconds_per_step")}
    elif stage == "train-pm":
        figures = {k: metrics.get(k) for k in ("train_comparisons", "steps", "comparisons_per_s")}
        for name, result in (metrics.get("eval") or {}).items():
            figures[f"{name} accuracy"] = result.get("accuracy")
            figures[f"{name} ECE"] = result.get("ece")
    elif stage == "ppo":
        figures = {k: metrics.get(k) for k in ("steps", "heldout_reward_before", "heldout_reward_after", "kl",
                                              "seconds_per_step", "stopped")}
    plots = sorted(p.name for p in path.glob("*.png"))
    return {"stage": stage, "path": str(path), "figures": _rounded(figures), "plots": plots}


def revision_statistics(records: list[dict]) -> dict:
    """Per principle: rounds it drove, how often the revision changed the response, and by how much
    (1 - word-level similarity to the response before the round); the same over all rounds."""
    per: dict[str, dict] = {}
    changed_rows, flags = 0, {}
    for record in records:
        current = record["initial_response"]
        for step in record["steps"]:
            entry = per.setdefault(step["principle"], {"rounds": 0, "changed": 0, "change_size": 0.0, "discarded": 0})
            entry["rounds"] += 1
            if UNUSABLE_REVISION_FLAGS & set(step.get("flags", [])):
                entry["discarded"] += 1
                continue  # recorded, but revise did not build on it
            revision = step["revision"]
            if revision.strip() != current.strip():
                entry["changed"] += 1
            entry["change_size"] += 1 - difflib.SequenceMatcher(None, current.split(), revision.split()).ratio()
            current = revision
        changed_rows += record["response"].strip() != record["initial_response"].strip()
        for flag in record.get("flags", []):
            flags[flag] = flags.get(flag, 0) + 1

    def finish(e: dict) -> dict:
        kept = e["rounds"] - e["discarded"]
        return {"rounds": e["rounds"], "change_rate": round(e["changed"] / kept, 4) if kept else None,
                "mean_change_size": round(e["change_size"] / kept, 4) if kept else None,
                "discarded_rate": round(e["discarded"] / e["rounds"], 4)}

    total = {k: sum(e[k] for e in per.values()) for k in ("rounds", "changed", "change_size", "discarded")}
    return {"prompts": len(records), "final_differs_from_initial": round(changed_rows / max(len(records), 1), 4),
            "flags": dict(sorted(flags.items())), "overall": finish(total) if total["rounds"] else None,
            "per_principle": {pid: finish(e) for pid, e in sorted(per.items(), key=lambda x: -x[1]["rounds"])}}


def _rounded(figures: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


# Output -------------------------------------------------------------------------------------------------


def render(summary: dict, found: Found, out: Path) -> str:
    def link(path: Path | str) -> str:
        return os.path.relpath(path, out)

    lines = ["# caictl run report", "", *random_weights_warning(models_used(summary))]
    if summary["stages"]:
        lines += ["## Stages", "", "| stage | folder | figures |", "|---|---|---|"]
        for entry in summary["stages"]:
            figures = ", ".join(f"{k}: {v}" for k, v in entry["figures"].items() if v is not None)
            lines.append(f"| {entry['stage']} | `{entry['path']}` | {figures} |")
        lines.append("")
        if any(e["figures"].get("random_weights") for e in summary["stages"]):
            lines += ["Models built by `caictl init-model` have RANDOM weights: every stage ran for real, but the "
                      "text is noise and the figures say nothing about the method's quality.", ""]
        for entry in summary["stages"]:
            lines += [f"![{entry['stage']}: {p}]({link(Path(entry['path']) / p)})" for p in entry["plots"]]
        lines.append("")
    if summary["revisions"] or summary["labels"]:
        lines += ["## Which principles did what", "", "![principles](principles.png)", ""]
    for path, stats in summary["revisions"].items():
        overall = stats["overall"] or {}
        lines += [f"### Revisions: `{path}`", "",
                  f"{stats['prompts']} prompts; the final response differs from the first in "
                  f"{stats['final_differs_from_initial']:.0%} of them; a round changed the response "
                  f"{_pct(overall.get('change_rate'))} of the time. Flags: "
                  f"{', '.join(f'{k} {v}' for k, v in stats['flags'].items()) or 'none'}.", ""]
        lines += table(["principle", "rounds", "changed", "mean change size", "discarded"],
                       [[pid, p["rounds"], _pct(p["change_rate"]), number(p["mean_change_size"]),
                         _pct(p["discarded_rate"])] for pid, p in stats["per_principle"].items()])
    for path, stats in summary["labels"].items():
        overall = stats["overall"]
        lines += [f"### Labels: `{path}`", "",
                  f"{overall['votes']} votes; mean confidence {number(overall['mean_confidence'])}, position "
                  f"consistency {_pct(overall['position_consistency'])}, slot A wins "
                  f"{_pct(overall['first_slot_preference'])}.", ""]
        lines += table(["principle", "votes", "mean confidence", "position consistency", "slot A wins"],
                       [[pid, p["votes"], number(p["mean_confidence"]), _pct(p["position_consistency"]),
                         _pct(p["first_slot_preference"])] for pid, p in stats["per_principle"].items()])
    for path, compare in summary["compare"].items():
        lines += [f"## Models compared: `{path}`", "", f"Full report: [{link(Path(path) / 'report.md')}]"
                  f"({link(Path(path) / 'report.md')})", ""]
        models = list(compare["models"])
        for source, by_group in compare["ratings"].items():
            lines += [f"Elo from the {'preference model' if source == 'pm' else 'judge'} (relative to {models[0]}):",
                      "", "| set | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
            lines += [f"| {g} | " + " | ".join(f"{r['elo'][m]['elo']:+.0f}" for m in models) + " |"
                      for g, r in by_group.items()]
            lines.append("")
        group = "all" if "all" in compare["per_model"] else next(iter(compare["per_model"]))
        lines += [f"Signs of Goodharting ({group}):", "", "| model | refusal | boilerplate | distinct-2 | mean words |",
                  "|---|---|---|---|---|"]
        lines += [f"| {m} | {_pct(s['refusal_rate'])} | {_pct(s['boilerplate_rate'])} | {number(s['distinct_2'])} | "
                  f"{s['mean_length_words']} |" for m, s in compare["per_model"][group].items()]
        lines += ["", *(f"![{p.stem}]({link(p)})" for p in sorted(Path(path).glob("*.png"))), ""]
    for path, scores in summary["scores"].items():
        what = (f"Multiple-choice evaluation of `{scores.get('model')}`" if scores["stage"] == "eval mc"
                else f"Preference model `{scores.get('pm')}` on comparisons")
        lines += [f"## {what}: `{path}`", "", f"Full report: [{link(Path(path) / 'report.md')}]"
                  f"({link(Path(path) / 'report.md')})", ""]
        columns = list(next(iter(scores["files"].values()), {}))
        lines += table(["file", *columns], [[Path(f).name, *(r.get(c) for c in columns)]
                                            for f, r in scores["files"].items()])
    for path, labelled in summary["labelers"].items():
        lines += [f"## Labeller against people: `{path}`", "",
                  f"Feedback model `{labelled.get('model')}`, constitution `{labelled.get('constitution')}`, "
                  f"principles: {labelled.get('principles')}. Full report: [{link(Path(path) / 'report.md')}]"
                  f"({link(Path(path) / 'report.md')})", ""]
        rows = []
        for file, entry in labelled["files"].items():
            for mode, result in entry["modes"].items():
                s = result["overall"]
                rows.append([Path(file).name, mode, f"{number(s['accuracy'])} ({number(s['accuracy_ci'][0])}-"
                             f"{number(s['accuracy_ci'][1])})", number(s["ece"]), _pct(s["position_flip_rate"]),
                             number(s["slot_a_preference"]), _pct(s["longer_preferred"]),
                             _pct(s["human_longer_preferred"])])
        lines += table(["file", "mode", "accuracy (95% CI)", "ECE", "position flips", "slot A preference",
                        "prefers longer", "people prefer longer"], rows)
        lines += [f"![{p.stem}]({link(p)})" for p in sorted(Path(path).glob("*.png"))] + [""]
    return "\n".join(lines)


def models_used(summary: dict) -> list[str]:
    """Every model folder the report covers: those found, and those the eval folders it read name."""
    models = [entry["path"] for entry in summary["stages"]]
    for compare in summary["compare"].values():
        models += compare["models"].values()
    for scores in [*summary["scores"].values(), *summary["labelers"].values()]:
        models += [scores[key] for key in ("model", "pm") if key in scores]
    return models


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def plot_principles(summary: dict, path: Path) -> None:
    """Per principle: how often its revisions changed the response; its labels' confidence and consistency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("revisions", p, s["per_principle"]) for p, s in summary["revisions"].items()]
    panels += [("labels", p, s["per_principle"]) for p, s in summary["labels"].items()]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for axis, (kind, source, per) in zip(axes[0], panels):
        names = list(per)
        ys = range(len(names))
        if kind == "revisions":
            bars = [("change_rate", "changed the response"), ("mean_change_size", "mean change size")]
        else:
            bars = [("mean_confidence", "mean confidence"), ("position_consistency", "position consistency")]
        for k, (key, label) in enumerate(bars):
            axis.barh([y + k * 0.4 for y in ys], [per[n][key] or 0 for n in names], 0.4, label=label)
        axis.set_yticks([y + 0.2 for y in ys], names, fontsize=7)
        axis.set_xlim(0, 1)
        axis.set_title(f"{kind}: {Path(source).name}", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
