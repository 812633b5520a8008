"""Proof that the GSPO and DPO stages learn, on CPU with the tiny preset (prints one JSON object).

    python3 bench/bench_rl_learning.py [--run-dir runs/bench_rl] [--rollouts 40] [--dpo-steps 120]

1. SFT weights: tiny pretrain_stage0 then COT SFT (trained once, cached in the run dir; pretrain_stage1 is skipped).
2. GSPO from the COT weights on the train prompts of sample_data/grpo.jsonl. Before and after: the mean Cortex reward
   of greedy completions on all held-out prompts (the stage's own eval, step 0 and the end).
3. DPO from the COT weights on sample_data/dpo.jsonl. Before and after: held-out preference accuracy (share of held-out
   pairs whose implicit reward prefers the chosen reply, i.e. policy margin > reference margin) and the DPO loss.
Targets: GSPO raises the held-out reward by >= 30% (relative), DPO reaches >= 0.9 accuracy.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import utils  # noqa: E402
from trainer.cli import build_task  # noqa: E402
from trainer.loop import run_stage  # noqa: E402
from trainer.metrics import read_metrics  # noqa: E402


def train(config) -> Path:
    return run_stage(config, lambda c: build_task(c, utils.data_files(c)))


def sft_weights(run_root: Path) -> Path:
    """Tiny pretrain_stage0 -> cot; each stage is skipped when its run dir is already complete."""
    quiet = dict(run_root=str(run_root), eval_every_steps=0, save_every_steps=10**9)
    train(replace(utils.stage_config("pretrain_stage0", "tiny"), **quiet))
    return train(replace(utils.stage_config("cot", "tiny"), init_from=str(run_root / "pretrain_stage0"), **quiet))


def fresh(run_root: Path, stage: str) -> None:
    shutil.rmtree(run_root / stage, ignore_errors=True)


def gspo(run_root: Path, sft: Path, rollouts: int) -> dict:
    fresh(run_root, "grpo")
    config = utils.stage_config("grpo", "tiny")
    config = replace(config, run_root=str(run_root), init_from=str(sft), eval_every_steps=0, save_every_steps=10**9,
                     max_steps=rollouts * config.grpo.grpo_steps)
    start = time.perf_counter()
    out = train(config)
    seconds = time.perf_counter() - start
    evals = read_metrics(out / "metrics.jsonl", "eval")
    steps = read_metrics(out / "metrics.jsonl")
    before, after = evals[0], evals[-1]
    return {"rollouts": rollouts, "prompts_per_rollout": config.micro_batch_size, "group_size": config.grpo.group_size,
            "completions": rollouts * config.micro_batch_size * config.grpo.group_size,
            "optimizer_steps": steps[-1]["step"], "heldout_prompts": config.micro_batch_size * config.data.max_eval_batches,
            "heldout_reward_before": round(before["eval_reward"], 4), "heldout_reward_after": round(after["eval_reward"], 4),
            "relative_increase": round(after["eval_reward"] / before["eval_reward"] - 1, 4),
            "exact_match_before": round(before["eval_exact_match"], 4),
            "exact_match_after": round(after["eval_exact_match"], 4),
            "train_reward_first_rollouts": round(sum(s["reward_mean"] for s in steps[:10]) / len(steps[:10]), 4),
            "train_reward_last_rollouts": round(sum(s["reward_mean"] for s in steps[-10:]) / len(steps[-10:]), 4),
            "seconds": round(seconds, 1)}


def dpo(run_root: Path, sft: Path, steps: int) -> dict:
    fresh(run_root, "dpo")
    config = utils.stage_config("dpo", "tiny")
    config = replace(config, run_root=str(run_root), init_from=str(sft), eval_every_steps=0, save_every_steps=10**9,
                     max_steps=steps)
    start = time.perf_counter()
    out = train(config)
    seconds = time.perf_counter() - start
    evals = read_metrics(out / "metrics.jsonl", "eval")
    before, after = evals[0], evals[-1]
    return {"optimizer_steps": steps, "pairs_per_step": config.micro_batch_size * config.grad_accum_steps,
            "heldout_pairs": config.micro_batch_size * config.data.max_eval_batches,
            "heldout_accuracy_before": round(before["eval_reward_accuracy"], 4),
            "heldout_accuracy_after": round(after["eval_reward_accuracy"], 4),
            "heldout_dpo_loss_before": round(before["eval_loss"], 4), "heldout_dpo_loss_after": round(after["eval_loss"], 4),
            "heldout_margin_after": round(after["eval_reward_margin"], 4), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "bench_rl", help="run root (SFT stages are cached here)")
    parser.add_argument("--rollouts", type=int, default=40, help="GSPO rollouts (each: prompts_per_rollout x group_size)")
    parser.add_argument("--dpo-steps", type=int, default=120)
    args = parser.parse_args()
    start = time.perf_counter()
    sft = sft_weights(args.run_dir)
    sft_seconds = time.perf_counter() - start
    result = {"sft_seconds": round(sft_seconds, 1), "gspo": gspo(args.run_dir, sft, args.rollouts),
              "dpo": dpo(args.run_dir, sft, args.dpo_steps)}
    result["gspo"]["target_met"] = result["gspo"]["relative_increase"] >= 0.30
    result["dpo"]["target_met"] = result["dpo"]["heldout_accuracy_after"] >= 0.9
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
