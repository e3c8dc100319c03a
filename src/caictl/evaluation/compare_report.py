"""The `caictl eval compare` report: report.md and its figures (elo.png, winrates.png, frontier.png,
goodhart.png), drawn from the summary the stage writes to summary.json.

Nothing here reads models or records: `report(summary)` and `plot(summary, out)` take only the summary dict
(what summary.json holds). `STAT_COLUMNS` and `format_stat` are also the stage's terminal summary.
"""

from __future__ import annotations

from pathlib import Path

from caictl.evaluation.markdown import random_weights_warning

STAT_COLUMNS = [("constraints_met", "constraints met"), ("prompts_all_met", "prompts, all met"),
                ("mean_reward", "PM reward"), ("refusal_rate", "refusal"), ("judge_refusal", "judge P(refusal)"),
                ("boilerplate_rate", "boilerplate"), ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"),
                ("mean_length_words", "mean words")]


def report(summary: dict) -> str:
    models = list(summary["models"])
    lines = ["# caictl eval compare", "",
             *random_weights_warning([*summary["models"].values(), summary["pm"], summary["judge"]]),
             f"Models: {', '.join(f'`{n}` ({p})' for n, p in summary['models'].items())}. "
             f"Prompt sets: {', '.join(f'{s} ({n})' for s, n in summary['sets'].items())}. "
             f"PM: `{summary['pm'] or '-'}`. Judge: `{summary['judge'] or '-'}`"
             + (", judging each set under the constitution " + ", ".join(
                 f"{s}: `{n}`" for s, n in summary["set_constitutions"].items()) if summary["judge"] else "") + ".", ""]
    for source, by_group in summary["ratings"].items():
        title = "Preference model" if source == "pm" else "Judge (feedback model, both orders)"
        lines += [f"## {title}: Elo and win rates", "",
                  "| set | " + " | ".join(f"{m} Elo (95% CI)" for m in models) + " |", "|---" * (len(models) + 1) + "|"]
        for group, result in by_group.items():
            lines.append(f"| {group} | " + " | ".join(
                f"{result['elo'][m]['elo']:+.0f} ({result['elo'][m]['ci'][0]:+.0f}, {result['elo'][m]['ci'][1]:+.0f})"
                for m in models) + " |")
        lines += ["", "| set | model A | model B | A's win rate | 95% CI | comparisons |", "|---|---|---|---|---|---|"]
        for group, result in by_group.items():
            lines += [f"| {group} | {w['a']} | {w['b']} | {w['win_rate']:.3f} | {w['ci'][0]:.3f}-{w['ci'][1]:.3f} "
                      f"| {w['comparisons']} |" for w in result["win_rates"]]
        lines.append("")
    if summary["ratings"]:
        lines += ["![Elo](elo.png)", "", "![win rates](winrates.png)", ""]
    if summary.get("frontier"):
        f = summary["frontier"]
        lines += [f"## Helpfulness against harmlessness ({'judge' if f['source'] == 'judge' else 'preference model'})",
                  "", "Elo on the sets judged under `helpful` and on those judged under `harmless`, relative to "
                  f"{models[0]}.", "", "| model | helpfulness Elo | harmlessness Elo |", "|---|---|---|"]
        lines += [f"| {m} | {f['helpful'][m]:+.0f} | {f['harmless'][m]:+.0f} |" for m in models]
        lines += ["", "![frontier](frontier.png)", ""]
    lines += ["## Signs of Goodharting", "",
              "Refusal: a phrase detector on the opening of each response (see `caictl.evaluation.textstats`). "
              "Boilerplate: "
              "share of responses holding a word 8-gram that recurs across prompts. distinct-n: distinct word "
              "n-grams over all n-grams."
              + (" Constraints met: the share of the prompts' checkable constraints (`caictl.data.constraints`) the "
                 "responses meet; prompts, all met: the share of prompts whose constraints are all met."
                 if any("constraints_met" in s for g in summary["per_model"].values() for s in g.values()) else ""),
              ""]
    for group, by_model in summary["per_model"].items():
        columns = [(k, t) for k, t in STAT_COLUMNS if any(k in s for s in by_model.values())]
        lines += [f"**{group}**", "", "| model | " + " | ".join(t for _, t in columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(format_stat(s.get(k)) for k, _ in columns) + " |"
                  for m, s in by_model.items()]
        repeated = [(m, s["top_boilerplate"]) for m, s in by_model.items() if s["top_boilerplate"]]
        lines += [""] + [f"- `{m}` repeats: " + "; ".join(f"\"{g}\" ({c}x)" for g, c in top) for m, top in repeated]
        lines.append("")
    lines += ["![Goodharting signs](goodhart.png)", ""]
    return "\n".join(lines)


def format_stat(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(summary["models"])
    groups = list(summary["per_model"])
    width = 0.8 / len(models)
    if summary["ratings"]:
        sources = list(summary["ratings"])
        figure, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 3.6), squeeze=False)
        for axis, source in zip(axes[0], sources):
            by_group = summary["ratings"][source]
            for k, model in enumerate(models):
                values = [by_group[g]["elo"][model]["elo"] for g in by_group]
                errors = [[v - by_group[g]["elo"][model]["ci"][0] for v, g in zip(values, by_group)],
                          [by_group[g]["elo"][model]["ci"][1] - v for v, g in zip(values, by_group)]]
                axis.bar([i + k * width for i in range(len(by_group))], values, width, yerr=errors, capsize=3,
                         label=model)
            axis.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(by_group))], list(by_group))
            axis.axhline(0, color="grey", linewidth=0.8)
            axis.set_title(f"Elo ({source}), relative to {models[0]}")
            axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / "elo.png", dpi=100)
        plt.close(figure)

        columns = max(len(summary["ratings"][s]) for s in sources)
        figure, axes = plt.subplots(len(sources), columns, figsize=(3.6 * columns, 3.4 * len(sources)), squeeze=False)
        for axis in axes.flat:
            axis.set_visible(False)
        panels = [(axes[r][c], s, g) for r, s in enumerate(sources) for c, g in enumerate(summary["ratings"][s])]
        for axis, source, group in panels:
            axis.set_visible(True)
            matrix = [[float("nan")] * len(models) for _ in models]
            for w in summary["ratings"][source][group]["win_rates"]:
                i, j = models.index(w["a"]), models.index(w["b"])
                matrix[i][j], matrix[j][i] = w["win_rate"], 1 - w["win_rate"]
            axis.imshow(matrix, vmin=0, vmax=1, cmap="RdBu")
            for i in range(len(models)):
                for j in range(len(models)):
                    if i != j:
                        axis.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=8)
            axis.set_xticks(range(len(models)), models, rotation=30, fontsize=7)
            axis.set_yticks(range(len(models)), models, fontsize=7)
            axis.set_title(f"{source}, {group}: row beats column", fontsize=9)
        figure.tight_layout()
        figure.savefig(out / "winrates.png", dpi=100)
        plt.close(figure)

    if summary.get("frontier"):
        f = summary["frontier"]
        figure, axis = plt.subplots(figsize=(4.2, 4))
        x, y = [f["helpful"][m] for m in models], [f["harmless"][m] for m in models]
        axis.plot(x, y, color="grey", linewidth=0.8, zorder=1)  # the models in the order given: base -> ... -> RL
        axis.scatter(x, y, zorder=2)
        for m, xm, ym in zip(models, x, y):
            axis.annotate(m, (xm, ym), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xlabel("helpfulness Elo")
        axis.set_ylabel("harmlessness Elo")
        axis.set_title(f"frontier ({f['source']})", fontsize=9)
        figure.tight_layout()
        figure.savefig(out / "frontier.png", dpi=100)
        plt.close(figure)

    stats = [("refusal_rate", "refusal rate"), ("boilerplate_rate", "boilerplate rate"),
             ("distinct_2", "distinct-2"), ("mean_length_words", "mean words")]
    figure, axes = plt.subplots(1, len(stats), figsize=(3.4 * len(stats), 3.2))
    for axis, (key, title) in zip(axes, stats):
        for k, model in enumerate(models):
            axis.bar([i + k * width for i in range(len(groups))],
                     [summary["per_model"][g][model][key] or 0 for g in groups], width, label=model)
        axis.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(groups))], groups, fontsize=7)
        axis.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "goodhart.png", dpi=100)
    plt.close(figure)
