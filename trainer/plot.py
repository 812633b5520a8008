"""Turn a run's metrics.jsonl into PNG plots.

    python3 -m trainer.plot runs/pretrain_stage0            # writes runs/pretrain_stage0/plots/{loss,lr,...}.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from trainer.metrics import read_metrics  # noqa: E402

PANELS = {  # file name -> metric keys drawn together
    "loss": ["loss", "lm_loss"],
    "lr": ["lr"],
    "aux_loss": ["aux_loss"],
    "grad_norm": ["grad_norm"],
    "throughput": ["tokens_per_s"],
}


def plot_run(run_dir: Path, panels: Sequence[str] = tuple(PANELS)) -> list[Path]:
    """PNGs of the run's metrics, one per panel (a name of PANELS), in run_dir/plots/."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise FileNotFoundError(f"{metrics} not found: pass a stage run dir (e.g. runs/pretrain_stage0) that has trained")
    train = read_metrics(metrics, "train")
    evals = read_metrics(metrics, "eval")
    if not train:
        raise ValueError(f"{metrics} holds no training steps yet")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name in panels:
        keys = PANELS[name]
        series = {k: [(r["step"], r[k]) for r in train if isinstance(r.get(k), (int, float))] for k in keys}
        if name == "loss":
            series["eval_loss"] = [(r["step"], r["eval_loss"]) for r in evals if "eval_loss" in r]
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, label=key, marker="o" if key == "eval_loss" else None, markersize=3)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{run_dir.name}: {name}")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot loss/lr curves of a Cortex run into PNG files")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="stage run dirs, e.g. runs/pretrain_stage0")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        try:
            for path in plot_run(run_dir):
                print(path)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
