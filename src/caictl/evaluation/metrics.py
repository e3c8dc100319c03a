"""Metrics shared by the stages that evaluate: pairwise preference metrics, calibration, reliability plot."""

from __future__ import annotations

import math
from pathlib import Path

ECE_BINS = 10


def pairwise_metrics(differences: list[float], targets: list[float]) -> dict:
    """Accuracy, mean margin and expected calibration error of s(rc - rr) against each label's p.

    For calibration every other pair is turned around (predicting `rejected` over `chosen`), so that the
    predicted probabilities span both halves of [0, 1] and a model that always says 0.5 is not calibrated
    by accident of the pair order."""
    predicted, observed = [], []
    for index, (difference, p) in enumerate(zip(differences, targets)):
        q = 1 / (1 + math.exp(-difference))
        predicted.append(1 - q if index % 2 else q)
        observed.append(1 - p if index % 2 else p)
    accuracy = sum((d > 0) == (p >= 0.5) for d, p in zip(differences, targets)) / len(differences)
    ece, bins = calibration(predicted, observed)
    return {"comparisons": len(differences), "accuracy": round(accuracy, 4),
            "mean_margin": round(sum(differences) / len(differences), 4), "ece": round(ece, 4), "reliability": bins}


def calibration(predicted: list[float], targets: list[float], n_bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error: the share-weighted gap between mean prediction and mean target per bin."""
    bins = []
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i, q in enumerate(predicted) if lo <= q < hi or (b == n_bins - 1 and q == 1.0)]
        if members:
            bins.append({"lo": lo, "hi": hi, "count": len(members),
                         "predicted": sum(predicted[i] for i in members) / len(members),
                         "observed": sum(targets[i] for i in members) / len(members)})
    total = len(predicted) or 1
    ece = sum(b["count"] / total * abs(b["predicted"] - b["observed"]) for b in bins)
    return ece, bins


def plot_reliability(metrics: dict, path: Path, xlabel: str = "predicted P(preferred)",
                     ylabel: str = "label P(preferred)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect")
    for name, m in metrics.items():
        axis.plot([b["predicted"] for b in m["reliability"]], [b["observed"] for b in m["reliability"]], marker="o",
                  label=f"{Path(name).name} (ECE {m['ece']:.3f})")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
