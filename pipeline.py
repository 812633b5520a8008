"""All six stages in order, eval.py after each, and a report card: runs/report.md.

    CORTEX_PRESET=tiny python3 pipeline.py                      # the quick start in one command (CPU)
    python3 pipeline.py --include localhost:0,1                 # full model: each stage through smart_train
    python3 pipeline.py --stages cot grpo -- --max-steps 10     # some stages; flags after -- go to every stage script
    python3 pipeline.py --eval-args "--limit 50 --device cuda"  # flags for every eval.py run

Resumable: a finished stage (its stage.json written) is not trained again and a finished eval (its eval/report.json)
is not run again; an interrupted stage resumes from its last checkpoint. Flags before `--` that are not the
pipeline's own (--include, --num_gpus, --hostfile, ...) go to smart_train, which then launches each stage; without
them every stage runs in this process. Pretraining stages are evaluated on held-out loss and routing only (a base model
has no chat format to score); the others on every section of eval.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import eval as eval_report
import utils
from trainer.checkpoint import STAGE_DONE, RunDir
from trainer.cli import run
from trainer.config import STAGE_ORDER
from trainer.metrics import read_metrics
from trainer.plot import plot_run

PRETRAIN_EVAL = ["--sections", "loss", "moe"]  # a base model: no chat format, no arithmetic answers to score
# Between chat stages a shorter eval: greedy only (no sampled pass@1) and three thinking budgets; the last stage run
# gets every section in full. Same prompts throughout, so the rows compare.
BETWEEN_EVAL = ["--samples", "0", "--budgets", "0", "16", "unlimited"]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
    """(pipeline flags, launcher flags for smart_train, flags for every stage script)."""
    own, script_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", choices=STAGE_ORDER, default=list(STAGE_ORDER),
                        help="the stages to run, in pipeline order (default: all six)")
    parser.add_argument("--run-dir", type=Path, default=Path(os.environ.get("CORTEX_RUN_DIR", "./runs")),
                        help="root of the run dirs and of report.md (default: CORTEX_RUN_DIR or ./runs)")
    parser.add_argument("--eval-args", default="", help="flags for every eval.py run, in one string")
    parser.add_argument("--no-eval", action="store_true", help="train only; the report shows the training columns")
    args, launcher_args = parser.parse_known_args(own)
    if "--run-dir" in script_args:
        parser.error("give --run-dir before --, as a pipeline flag: the pipeline passes it on to every stage")
    return args, launcher_args, script_args + ["--run-dir", str(args.run_dir)]


def train_stage(stage: str, launcher_args: list[str], script_args: list[str]) -> None:
    script = f"train_{stage}.py"
    if launcher_args:  # GPUs: smart_train starts the stage's ranks
        command = [sys.executable, "-m", "trainer.launch", script, *launcher_args, "--", *script_args]
        status = subprocess.run(command).returncode
        if status != 0:
            raise SystemExit(f"error: {shlex.join(command)} failed with exit status {status}; fix it and rerun "
                             f"pipeline.py (finished stages are skipped, {stage} resumes from its last checkpoint)")
        return
    run(utils.stage_config(stage), utils.data_files, script_args)


def eval_stage(stage: str, run_dir: Path, eval_args: list[str], last: bool) -> dict:
    out = run_dir / stage / "eval"
    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text(encoding="utf-8"))
    sections = PRETRAIN_EVAL if stage.startswith("pretrain") else [] if last else BETWEEN_EVAL
    return eval_report.main(["--checkpoint", str(run_dir / stage), "--out", str(out), *sections, *eval_args])


# --- the report card --------------------------------------------------------------------------------------------------

def stage_row(stage: str, run_dir: Path, report: dict | None) -> dict:
    path = run_dir / stage
    summary = json.loads((path / STAGE_DONE).read_text(encoding="utf-8"))
    train = read_metrics(path / "metrics.jsonl")
    evals = read_metrics(path / "metrics.jsonl", "eval")
    times = [r["time"] for r in train + evals]
    row = {"stage": stage, "steps": summary["steps"], "tokens": summary["tokens_seen"],
           "wall_s": round(max(times) - min(times), 1) if times else None,
           "train_loss": train[-1].get("loss") if train else None,
           "stage_heldout": _stage_heldout(evals[-1]) if evals else None}
    if report:
        row["eval"] = report
    return row


def _stage_heldout(record: dict) -> str:
    """The stage's own last held-out figure: its loss, or GSPO's greedy reward."""
    if "eval_loss" in record:
        return f"loss {record['eval_loss']:.3f}"
    return f"reward {record['eval_reward']:.2f}" if "eval_reward" in record else "-"


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report_card(rows: list[dict], run_dir: Path, wall_s: float, cpu_s: float) -> str:
    lines = ["# Report card", "",
             f"Preset `{os.environ.get('CORTEX_PRESET', 'full')}`, run dir `{run_dir}`. This pipeline.py run: "
             f"{wall_s:.0f} s wall, {cpu_s:.0f} s CPU (the process and its children; the steadier figure on a shared "
             "machine). Wall time: first to last record of the stage's metrics.jsonl. Eval columns: `eval.py` on the "
             "stage's final weights (held-out loss on the data the stage's eval report names; chat figures from cot "
             "on); between stages greedy only (pass@1 `-`) and budgets 0, 16 and unlimited, the last stage in full.", "",
             "| stage | steps | wall time | tokens | final train loss | stage's held-out | eval held-out loss "
             "| bits/byte | well-formed think / no-think | obeys /think / /no think | exact greedy | pass@1 "
             "| dead experts | eval wall / CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        e = row.get("eval", {})
        loss, fmt, acc, moe = e.get("loss", {}), e.get("format"), e.get("accuracy", {}), e.get("moe")
        pct = eval_report._pct
        lines.append(
            f"| {row['stage']} | {row['steps']} | {_num(row['wall_s'], 1)} s | {row['tokens']:,} | "
            f"{_num(row['train_loss'])} | {row['stage_heldout'] or '-'} | {_num(loss.get('loss'))} | "
            f"{_num(loss.get('bits_per_byte'))} | "
            + (f"{pct(fmt['think']['well_formed'])} / {pct(fmt['no_think']['well_formed'])} | "
               f"{pct(fmt['think']['obedience'])} / {pct(fmt['no_think']['obedience'])} | " if fmt else "- | - | ")
            + f"{pct(acc.get('greedy_exact_match'))} | {pct(acc.get('sampled_pass_at_1'))} | "
            + (f"{moe['dead_experts']} of {sum(len(layer['load']) for layer in moe['layers'])} | " if moe else "- | ")
            + (f"{e['seconds']} / {e['cpu_seconds']} s |" if e else "- |"))
    budgeted = [row for row in rows if row.get("eval", {}).get("budget")]
    if budgeted:
        budgets = [r["budget"] for r in budgeted[-1]["eval"]["budget"]]
        lines += ["", "## Exact match against thinking budget (greedy, held-out GRPO prompts)", "",
                  "| stage | " + " | ".join("unlimited" if b is None else str(b) for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for row in budgeted:
            by_budget = {r["budget"]: r for r in row["eval"]["budget"]}
            lines.append(f"| {row['stage']} | " + " | ".join(
                f"{eval_report._pct(by_budget[b]['exact_match'])} · {by_budget[b]['mean_own_thinking_tokens']:.0f} · "
                f"{eval_report._pct(by_budget[b]['cut_share'])}" if b in by_budget else "-" for b in budgets) + " |")
        last = budgeted[-1]
        lines += ["", "Cells: exact match · mean thinking tokens of the model's own (a closing sentence forced by the "
                      "budget not counted) · share of thoughts the budget cut. A budget counts the closing sentence "
                      f"({', '.join(f'{n} tokens in {lang}' for lang, n in last['eval']['budget_closing_sentence_tokens'].items())}), "
                      "so one just above its length leaves less of the model's own thought than a smaller budget, which "
                      f"closes with `</think>` alone. Curve of {last['stage']}:", "",
                  f"![accuracy against thinking budget]({last['stage']}/eval/budget_curve.png)"]
    lines += ["", "## Loss curves", ""]
    lines += [f"![{row['stage']} loss]({row['stage']}/plots/loss.png)" for row in rows
              if (run_dir / row["stage"] / "plots" / "loss.png").is_file()]
    lines += ["", "Per-stage eval reports: " + ", ".join(f"[{r['stage']}]({r['stage']}/eval/report.md)"
                                                          for r in rows if r.get("eval"))]
    return "\n".join(lines) + "\n"


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (smart_train's ranks)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv: list[str] | None = None) -> Path:
    args, launcher_args, script_args = parse_args(sys.argv[1:] if argv is None else argv)
    stages = [s for s in STAGE_ORDER if s in args.stages]
    eval_args = shlex.split(args.eval_args)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    rows = []
    for stage in stages:
        if RunDir(args.run_dir, stage).is_complete():
            print(f"pipeline: {stage} is complete, not trained again", flush=True)
        else:
            print(f"pipeline: training {stage}", flush=True)
            stage_start = time.perf_counter()
            train_stage(stage, launcher_args, script_args)
            print(f"pipeline: {stage} trained in {time.perf_counter() - stage_start:.1f} s", flush=True)
        report = None if args.no_eval else eval_stage(stage, args.run_dir, eval_args, last=stage == stages[-1])
        plot_run(args.run_dir / stage, panels=["loss"])  # the card shows the loss curves only
        rows.append(stage_row(stage, args.run_dir, report))
    path = args.run_dir / "report.md"
    wall_s, cpu_s = time.perf_counter() - start, _cpu_seconds() - cpu_start
    path.write_text(report_card(rows, args.run_dir, wall_s, cpu_s), encoding="utf-8")
    print(f"pipeline: report card in {path} ({wall_s:.0f} s wall, {cpu_s:.0f} s CPU with children)", flush=True)
    return path


if __name__ == "__main__":
    main()
