"""`python -m lab report PATH... [--out DIR]`: one self-contained HTML page comparing runs, without W&B.

PATH is a run directory (it holds `metrics.jsonl`) or any directory above runs (a sweep, `outputs/`).
The page has one section per experiment (runs of an MNIST classifier and of an agent are not compared):
its learning curves (one chart per metric, one line per run, against `env_steps` for agents and `step`
otherwise), a table of final and best metrics with the hyperparameters that differ between its runs, and
its best run by its main metric. The charts are also written as PNG files.
"""

from __future__ import annotations

import argparse
import base64
import html
import io as stdio
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import io
from lab.errors import LabError
from lab.io import read_metrics

MAX_CHARTS = 12


@dataclass
class Run:
    path: Path
    name: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def experiment(self) -> str:
        return str(self.config.get("experiment") or self.summary.get("experiment") or "unknown experiment")

    @property
    def main_metric(self) -> str | None:
        return self.summary.get("main_metric")

    @property
    def objective(self) -> float | None:
        """The best value of the main metric (else its last value)."""
        m = self.main_metric
        value = self.summary.get(f"best/{m}", self.summary.get(m)) if m else None
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def find_runs(paths: list[Path]) -> list[Run]:
    dirs: list[Path] = []
    for p in paths:
        if not p.exists():
            raise LabError(f"{p} does not exist; pass run directories or a sweep directory")
        found = [p] if (p / "metrics.jsonl").exists() else sorted(m.parent for m in p.rglob("metrics.jsonl"))
        dirs += [d for d in found if not any(part.startswith(".") for part in d.relative_to(p).parts)]
    if not dirs:
        raise LabError(f"no runs (directories with metrics.jsonl) under {', '.join(map(str, paths))}")
    root = Path(*_common_parts([d.resolve() for d in dirs]))
    runs = []
    for d in dict.fromkeys(dirs):
        rows = read_metrics(d)
        summary = io.read_json(d / "summary.json")
        name = str(d.resolve().relative_to(root)) if d.resolve() != root else d.name
        runs.append(Run(d, name or d.name, rows, summary, _read_config(d)))
    return runs


def _common_parts(paths: list[Path]) -> tuple[str, ...]:
    parts = list(paths[0].parts)
    for p in paths[1:]:
        n = 0
        while n < min(len(parts), len(p.parts)) and parts[n] == p.parts[n]:
            n += 1
        parts = parts[:n]
    if len(paths) == 1:
        parts = parts[:-1]
    return tuple(parts) or ("/",)


def _read_config(run_dir: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.exists():
            try:
                return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]
            except Exception:  # noqa: BLE001 - an unreadable config only costs the hyperparameter columns
                return {}
    return {}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def differing_hparams(runs: list[Run]) -> list[str]:
    flat = [_flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat))
    skip = ("logger.group", "logger.tags", "logger.name")
    return [k for k in keys if k not in skip and len({json.dumps(f.get(k), default=str) for f in flat}) > 1]


def best_run(runs: list[Run]) -> Run | None:
    scored = [r for r in runs if r.objective is not None]
    if not scored:
        return None
    mode = scored[0].summary.get("main_mode", "max")
    return (max if mode == "max" else min)(scored, key=lambda r: r.objective)


def chart_keys(runs: list[Run]) -> list[str]:
    """Metrics with a curve (two or more points in some run), the main metric first, then eval/, then the rest."""
    points: dict[str, int] = {}
    for r in runs:
        seen: dict[str, int] = {}
        for row in r.rows:
            for k, v in row.items():
                if "/" in k and not k.startswith(("perf/", "best/")) and isinstance(v, (int, float)):
                    seen[k] = seen.get(k, 0) + 1
        for k, n in seen.items():
            points[k] = max(points.get(k, 0), n)
    keys = [k for k, n in points.items() if n >= 2]
    mains = [r.main_metric for r in runs if r.main_metric in keys]
    order = sorted(keys, key=lambda k: (k not in mains, not k.startswith("eval/"), k))
    return order[:MAX_CHARTS]


def step_axis(runs: list[Run]) -> str:
    """The x-axis of one experiment's charts: `env_steps` for agents, else the trainer's `step`."""
    return "env_steps" if any("env_steps" in row for r in runs for row in r.rows) else "step"


def by_experiment(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.experiment, []).append(r)
    return dict(sorted(groups.items()))


def plot_metric(runs: list[Run], key: str):
    from lab.plots import plt

    x_key = step_axis(runs)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for r in runs:
        pts = [(row[x_key], row[key]) for row in r.rows
               if x_key in row and isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, markersize=3, label=r.name, linewidth=1.4)
    ax.set_xlabel(x_key)
    ax.set_title(key)
    ax.grid(alpha=0.3)
    if len(runs) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def seed_line(runs: list[Run], main: str | None) -> str:
    """For runs that differ only in `seed`: the IQM of their final main metric with its 95% bootstrap interval
    (rliable), their worst and their mean, as one HTML paragraph (empty otherwise)."""
    from lab import seeds

    finals = [r.summary.get(main) for r in runs] if main else []
    if len(runs) < 2 or differing_hparams(runs) != ["seed"] or not all(isinstance(v, (int, float)) for v in finals):
        return ""
    point, lo, hi = seeds.interval([float(v) for v in finals])
    mode = runs[0].summary.get("main_mode", "max")
    e = html.escape
    return (f'<p class="seeds">Across {len(finals)} seeds: IQM of the final {e(main)} = <b>{point:.4g}</b> '
            f"(95% CI {lo:.4g} to {hi:.4g}); worst {seeds.aggregate(finals, 'worst', mode):.4g}, "
            f"mean {seeds.aggregate(finals, 'mean', mode):.4g}.</p>")


def _section(runs: list[Run], figures: Path, title: str | None) -> str:
    """One experiment's table, best run and charts (PNG files in `figures`) as HTML."""
    from lab.plots import plt

    figures.mkdir(parents=True, exist_ok=True)
    best = best_run(runs)
    hp = differing_hparams(runs)
    charts = []
    for key in chart_keys(runs):
        fig = plot_metric(runs, key)
        buf = stdio.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        png = buf.getvalue()
        (figures / f"{key.replace('/', '_')}.png").write_bytes(png)
        charts.append((key, base64.b64encode(png).decode()))

    main = next((r.main_metric for r in runs if r.main_metric), None)
    cols = ["run", "status", "step", "elapsed_s"]
    if main:
        cols += [main, f"best/{main}"]
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in cols + hp)
    body = []
    for r in runs:
        flat = _flatten(r.config)
        cells = [r.name, r.summary.get("status", "no summary (running or killed)"), r.summary.get("step"),
                 r.summary.get("elapsed_s")]
        if main:
            cells += [r.summary.get(main), r.summary.get(f"best/{main}")]
        cells += [flat.get(k) for k in hp]
        cls = ' class="best"' if r is best else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{e(_fmt(c))}</td>" for c in cells) + "</tr>")
    best_line = (f"<p class=\"bestline\">Best run by {e(main or '')}: <b>{e(best.name)}</b> "
                 f"({e(_fmt(best.objective))})</p>" if best else "<p>No run has reached an evaluation yet.</p>")
    figs = "".join(f'<figure><img alt="{e(k)}" src="data:image/png;base64,{b}"><figcaption>{e(k)}</figcaption>'
                   "</figure>" for k, b in charts)
    heading = f'<h2 id="{e(title)}">{e(title)}</h2>\n' if title else ""
    best_line += seed_line(runs, main)
    return f"""{heading}<p>{len(runs)} run(s); main metric: {e(main or 'none')}; charts against {e(step_axis(runs))};
hyperparameters that differ: {e(', '.join(hp) or 'none')}.</p>
{best_line}
<h3>Runs</h3>
<table><thead><tr>{head}</tr></thead><tbody>
{''.join(body)}
</tbody></table>
<h3>Learning curves</h3>
{figs or '<p>No metrics logged yet.</p>'}
"""


def render(runs: list[Run], out_dir: Path) -> Path:
    """report.html in `out_dir`: one section per experiment (figures/ holds the charts; figures/EXPERIMENT/ when
    the runs are of several experiments)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = by_experiment(runs)
    e = html.escape
    if len(groups) == 1:
        sections = _section(runs, out_dir / "figures", None)
        contents = ""
    else:
        sections = "".join(_section(g, out_dir / "figures" / name, name) for name, g in groups.items())
        contents = "<p>Experiments: " + ", ".join(f'<a href="#{e(n)}">{e(n)}</a> ({len(g)})'
                                                  for n, g in groups.items()) + "</p>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lab report: {len(runs)} run(s)</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }}
table {{ border-collapse: collapse; font-size: 13px; margin: 12px 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
th {{ background: #f0f3f7; }}
tr.best td {{ background: #e6f6e6; font-weight: 600; }}
.bestline {{ font-size: 16px; }}
figure {{ display: inline-block; margin: 8px; }}
figure img {{ width: 560px; border: 1px solid #ddd; }}
figcaption {{ text-align: center; font-size: 12px; color: #555; }}
</style></head>
<body>
<h1>lab report</h1>
<p>{len(runs)} run(s) of {len(groups)} experiment(s).</p>
{contents}
{sections}
</body></html>
"""
    path = out_dir / "report.html"
    io.write_text(path, page)
    return path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab report", description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help="run directories or directories above them (a sweep)")
    ap.add_argument("--out", type=Path, help="output directory (default: <the one PATH>/report, else ./report)")
    a = ap.parse_args(argv)
    try:
        runs = find_runs(a.paths)
    except LabError as err:
        print(f"error: {err}")
        return 2
    out = a.out or (a.paths[0] / "report" if len(a.paths) == 1 else Path("report"))
    path = render(runs, out)
    print(f"[lab] report of {len(runs)} run(s): {path}")
    return 0
