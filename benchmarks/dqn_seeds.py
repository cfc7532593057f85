"""DQN over many seeds: the lab's recipe against stable-baselines3 with RL Zoo's hyperparameters, on the same
env, budget and evaluation protocol, reported the way Agarwal et al. (2021) ask for, through `rliable`.

    python benchmarks/dqn_seeds.py --env acrobot [--seeds 10] [--processes 2] [--only lab|sb3] [--runs-dir DIR]

For each agent, one `python -m lab +experiment=EXPERIMENT seeds=[0..N-1]` run (lab/seeds.py: every seed in its
own process, `--processes` at a time): the lab's `dqn_<env>` and SB3's `sb3_dqn_<env>` (RL Zoo's settings,
1 env), both with `logger=none agent.video=false`. Every seed is evaluated on 10 greedy games at the same
env steps (`agent.eval_every`, rounded to whole iterations) and at the end of its budget. The record has, per
agent, every seed's evaluation curve and *final* return, and from them (rliable, 2,000 stratified-bootstrap
draws): the interquartile mean of the final returns with its 95% interval, the share of seeds whose final
return reaches the env's threshold (CartPole 475, Acrobot -100, LunarLander 200), and the IQM learning curve
with its 95% band, drawn in `<name>.png` beside the record. Writes benchmarks/results/dqn_seeds_<env>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402

ENVS: dict[str, dict[str, Any]] = {
    "cartpole": {"id": "CartPole-v1", "lab": "dqn_cartpole", "sb3": "sb3_dqn_cartpole", "threshold": 475.0},
    "acrobot": {"id": "Acrobot-v1", "lab": "dqn_acrobot", "sb3": "sb3_dqn_acrobot", "threshold": -100.0},
    "lunarlander": {"id": "LunarLander-v3", "lab": "dqn_lunarlander", "sb3": "sb3_dqn_lunarlander",
                    "threshold": 200.0},
}
SETTINGS = ("agent", "optimizer", "scheduler", "env")


def run_seeds(experiment: str, seeds: list[int], processes: int, extra: list[str], work: Path) -> dict[str, Any]:
    """One multi-seed lab run of `experiment`; every seed's evaluations and final return, from its metrics.jsonl."""
    from omegaconf import OmegaConf

    from lab.io import read_json, read_metrics

    run_dir = work / experiment
    args = [f"+experiment={experiment}", "logger=none", "agent.video=false", "trainer.progress=false",
            f"seeds=[{','.join(map(str, seeds))}]", f"seeds_processes={processes}", *extra]
    def finished(seed: int) -> bool:
        summary = run_dir / f"seed_{seed}" / "summary.json"
        return summary.exists() and read_json(summary).get("status") == "completed"

    reused = [s for s in seeds if finished(s)]
    wall = None
    if len(reused) == len(seeds):  # --runs-dir: these seeds' runs finished before
        print(f"{experiment}: reading the finished runs of seeds {seeds} in {run_dir}", flush=True)
    else:  # a run dir from before: its completed seeds are read, the others continued (lab.seeds, resume=true)
        again = ["resume=true"] if (run_dir / "config.yaml").exists() else []
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lab", *args, *again, f"hydra.run.dir={run_dir}"], cwd=REPO,
                       check=True)
        wall = round(time.perf_counter() - t0, 1)
    runs = []
    for seed in seeds:
        rows = read_metrics(run_dir / f"seed_{seed}")
        evals = [{"env_steps": r["env_steps"], "eval_return": round(r["eval/episode_return"], 2)}
                 for r in rows if "eval/episode_return" in r]
        summary = read_json(run_dir / f"seed_{seed}" / "summary.json")
        runs.append({"seed": seed, "final_eval_return": evals[-1]["eval_return"], "evaluations": evals,
                     "env_steps": evals[-1]["env_steps"], "loop_elapsed_s": round(summary["perf/elapsed_s"], 1)})
    cfg = OmegaConf.load(run_dir / f"seed_{seeds[0]}" / "config.yaml")
    settings = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in SETTINGS if cfg.get(k) is not None}
    settings["trainer"] = {k: cfg.trainer.get(k) for k in ("grad_clip", "num_threads", "device", "precision")}
    return {"experiment": experiment, "command": " ".join(["python -m lab", *args]), "settings": settings,
            "multi_seed_wall_s": wall, "reused_run_dir": str(run_dir) if reused else None,
            "reused_seeds": reused,
            "median_loop_s_per_seed": round(statistics.median(r["loop_elapsed_s"] for r in runs), 1),
            "seeds_json": read_json(run_dir / "seeds.json") if (run_dir / "seeds.json").exists() else None,
            "runs": runs}


def reliability(agents: dict[str, list[dict[str, Any]]], threshold: float, title: str,
                png: Path | None = None) -> dict[str, Any]:
    """Per agent: rliable's IQM of the final returns with 95% intervals, the share of seeds ending at `threshold`
    or better, and the IQM learning curve (with 95% bands, into `png`) over the evaluations every seed has."""
    import numpy as np
    from rliable import library as rly
    from rliable import metrics

    from lab.seeds import interval

    out: dict[str, Any] = {}
    curves: dict[str, tuple[list[int], Any, Any]] = {}
    for name, runs in agents.items():
        finals = [r["final_eval_return"] for r in runs]
        point, lo, hi = interval(finals)
        out[name] = {"seeds": len(runs), "iqm_final_return": round(point, 2),
                     "iqm_final_return_ci95": [round(lo, 2), round(hi, 2)], "threshold": threshold,
                     "seeds_at_threshold": sum(f >= threshold for f in finals),
                     "share_final_at_threshold": round(sum(f >= threshold for f in finals) / len(runs), 3),
                     "final_returns": finals}
        n = min(len(r["evaluations"]) for r in runs)
        steps = [e["env_steps"] for e in runs[0]["evaluations"][:n]]
        scores = np.array([[e["eval_return"] for e in r["evaluations"][:n]] for r in runs], dtype=np.float64)
        np.random.seed(0)  # rliable's bootstrap draws from NumPy's global generator
        iqm, ci = rly.get_interval_estimates(
            {name: scores}, lambda x: np.array([metrics.aggregate_iqm(x[:, j]) for j in range(x.shape[1])]), reps=2000)
        curves[name] = (steps, iqm[name], ci[name])
        out[name]["iqm_curve"] = {"env_steps": steps, "iqm": [round(float(v), 2) for v in iqm[name]],
                                  "ci95_low": [round(float(v), 2) for v in ci[name][0]],
                                  "ci95_high": [round(float(v), 2) for v in ci[name][1]]}
    if png is not None:
        from lab.plots import plt

        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for name, (steps, iqm_curve, ci) in curves.items():
            ax.plot(steps, iqm_curve, marker="o", ms=3, label=f"{name} (IQM, {out[name]['seeds']} seeds)")
            ax.fill_between(steps, ci[0], ci[1], alpha=0.2)
        ax.axhline(threshold, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("env steps")
        ax.set_ylabel("evaluation return")
        ax.set_title(f"{title}: IQM of the evaluation return over seeds, 95% bootstrap bands", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", choices=sorted(ENVS), required=True)
    ap.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1")
    ap.add_argument("--processes", type=int, default=2, help="seeds trained at once (each its own process)")
    ap.add_argument("--only", choices=("lab", "sb3"), default=None, help="one side only (no ratio)")
    ap.add_argument("--lab-args", nargs="*", default=[], help="extra overrides for the lab's runs")
    ap.add_argument("--sb3-args", nargs="*", default=[], help="extra overrides for SB3's runs")
    ap.add_argument("--name", default=None, help="the record: benchmarks/results/<name>.json (default dqn_seeds_ENV)")
    ap.add_argument("--runs-dir", type=Path, default=None,
                    help="keep the runs in DIR/<experiment>/ (default: a temporary folder); seeds whose runs "
                         "finished there are read, not run again, and the others continued (resume=true)")
    ap.add_argument("--note", action="append", default=[], help="a line for the record's notes (how it was run)")
    args = ap.parse_args()
    env = ENVS[args.env]
    name = args.name or f"dqn_seeds_{args.env}"
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    sides = [s for s in ("lab", "sb3") if args.only in (None, s)]
    results: dict[str, Any] = {}
    def build(complete: bool) -> dict[str, Any]:
        runs = {s: results[s]["runs"] for s in results}
        png = record.RESULTS / f"{name}.png" if complete else None
        return {"complete": complete, "env": env["id"], "threshold": env["threshold"], "seeds": seeds,
                "processes": args.processes, **results,
                "reliability": reliability(runs, env["threshold"], env["id"], png),
                "benchmark_seconds": round(time.perf_counter() - t0, 1),
                "notes": ["final return: the mean of 10 greedy games at the end of the budget (not the best "
                          "evaluation); the lab steps its recipe's envs, SB3 RL Zoo's 1 env", *args.note]}

    with tempfile.TemporaryDirectory(prefix="lab-dqn-seeds-") as tmp:
        work = args.runs_dir or Path(tmp)
        for side in sides:
            extra = args.lab_args if side == "lab" else args.sb3_args
            results[side] = run_seeds(env[side], seeds, args.processes, extra, work)
            r = results[side]
            print(f"{side}: final returns {[x['final_eval_return'] for x in r['runs']]} "
                  f"({r['multi_seed_wall_s']} s)", flush=True)
            if side != sides[-1]:
                record.write(name, build(complete=False))  # a benchmark stopped midway keeps what it measured
    figures = build(complete=True)
    print(json.dumps({s: {k: v[k] for k in ("iqm_final_return", "iqm_final_return_ci95", "seeds_at_threshold")}
                      for s, v in figures["reliability"].items()}))
    record.write(name, figures)


if __name__ == "__main__":
    main()
