"""Learning curves from `metrics.jsonl`, so a run is readable without W&B."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lab.io import read_metrics  # noqa: E402


def plot_curves(path: str | Path, x: str = "step"):
    """One panel per metric name, `train/x` and `eval/x` drawn together against `x` (a task's step
    metric: an agent's `env_steps`). Timings (`perf/`) are left to W&B and the run report."""
    series: dict[str, dict[str, tuple[list, list]]] = defaultdict(dict)
    for row in read_metrics(path):
        if x not in row:
            continue
        for key, value in row.items():
            if "/" not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if not math.isfinite(value) or key in ("train/epoch",) or key.startswith("perf/"):
                continue
            split, name = key.split("/", 1)
            xs, ys = series[name].setdefault(split, ([], []))
            xs.append(row[x])
            ys.append(value)
    if not series:
        return None
    names = sorted(series, key=lambda n: (n not in ("loss", "accuracy"), n))
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for split, (xs, ys) in sorted(series[name].items()):
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=split)
        ax.set_title(name)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def confusion_figure(confusion, classes, label: str = "label"):
    """A confusion matrix (rows: true class, columns: prediction) coloured by the share of its row, the counts
    written where there are at most 20 classes; its title gives the accuracy."""
    k = len(classes)
    share = confusion.float() / confusion.sum(1, keepdim=True).clamp(min=1)
    cell = min(0.5, 14 / k)  # 52 topics still fit one page
    fig, ax = plt.subplots(figsize=(max(4.0, cell * k + 1.5), max(3.5, cell * k + 1)))
    ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    size = 7 if k <= 20 else 4
    ax.set_xticks(range(k), classes, rotation=60 if k <= 20 else 90, ha="right" if k <= 20 else "center",
                  fontsize=size)
    ax.set_yticks(range(k), classes, fontsize=size)
    if k <= 20:
        for r in range(k):
            for c in range(k):
                ax.text(c, r, str(confusion[r, c].item()), ha="center", va="center", fontsize=6,
                        color="white" if share[r, c] > 0.5 else "black")
    acc = confusion.diag().sum().item() / max(1, confusion.sum().item())
    ax.set_xlabel("prediction")
    ax.set_ylabel(label)
    ax.set_title(f"confusion matrix (shares of each row), test accuracy {acc:.2%}", fontsize=9)
    fig.tight_layout()
    return fig
