"""The folder an eval stage writes: records.jsonl, summary.json, reliability.png and report.md."""

from __future__ import annotations

import json
from pathlib import Path

from caictl.errors import UsageError
from caictl.evaluation.markdown import random_weights_warning
from caictl.evaluation.metrics import plot_reliability
from caictl.ui import print_summary


def existing_files(files: list[str]) -> list[str]:
    missing = [f for f in files if not Path(f).exists()]
    if missing or not files:
        raise UsageError(f"{', '.join(missing) or 'no input files'}: no such file")
    return files


def write_results(out: Path, title: str, counts: dict, subject: dict, results: dict, records: list[dict]) -> dict:
    with open(out / "records.jsonl", "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary = {"stage": title, **counts, **subject,
               "files": {p: {k: v for k, v in r.items() if k != "reliability"} for p, r in results.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_reliability(results, out / "reliability.png")
    columns = [k for k in next(iter(summary["files"].values()))]
    lines = [f"# caictl {title}", "", *random_weights_warning(subject.get(key) for key in ("model", "pm")),
             f"{', '.join(f'{k}: `{v}`' for k, v in subject.items())}", "",
             "| file | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {Path(p).name} | " + " | ".join(str(r[c]) for c in columns) + " |"
              for p, r in summary["files"].items()]
    lines += ["", "![reliability](reliability.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    rows = [(Path(p).name, ", ".join(f"{k} {v}" for k, v in r.items())) for p, r in summary["files"].items()]
    print_summary(title, summary, rows + [("report", out / "report.md")])
    return summary
