"""Command line of the stage scripts: `python3 train_x.py [--max-steps N] [--init-from PATH] ...`.

The stage's settings come from utils.py; these flags only override a few of them for one run.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from trainer.config import TrainConfig
from trainer.dpo import DPOTask
from trainer.grpo import GRPOTask
from trainer.tasks import LanguageModelingTask, Task
from trainer.tokenizer import get_tokenizer


def build_task(config: TrainConfig, data_files: Sequence[Path]) -> Task:
    tokenizer = get_tokenizer(config.tokenizer)
    if config.task in ("pretrain", "sft"):
        return LanguageModelingTask(config, tokenizer, data_files, kind=config.task)
    if config.task == "grpo":
        return GRPOTask(config, tokenizer, data_files)
    if config.task == "dpo":
        return DPOTask(config, tokenizer, data_files)
    raise ValueError(f"unknown task {config.task!r}: use pretrain, sft, grpo or dpo")


def parse_overrides(config: TrainConfig, argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser(description=f"Train the Cortex stage {config.stage!r} (settings in utils.py)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (the stage then counts as done)")
    parser.add_argument("--init-from", help="start from these weights (.bin, .safetensors or a stage run dir) instead of "
                                            "the previous stage's; 'none' for random init")
    parser.add_argument("--run-dir", help="root of the run dirs (default: CORTEX_RUN_DIR or ./runs)")
    parser.add_argument("--backend", choices=["auto", "deepspeed", "ddp", "single"])
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3])
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--grad-accum-steps", type=int)
    parser.add_argument("--save-every-steps", type=int)
    parser.add_argument("--eval-every-steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-samples", action="store_true", help="no sample generations at evals and the stage's end")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="a completed stage keeps all its checkpoints (default: only the last, beside the weights)")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same, so it is ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    changes = {}
    if args.max_steps is not None:
        changes["max_steps"] = args.max_steps
    if args.init_from is not None:
        changes["init_from"] = None if args.init_from.lower() == "none" else args.init_from
    if args.run_dir is not None:
        changes["run_root"] = args.run_dir
    for name in ("backend", "precision", "micro_batch_size", "grad_accum_steps", "save_every_steps", "eval_every_steps",
                 "seed"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.no_samples:
        changes["samples"] = False
    if args.keep_checkpoints:
        changes["keep_checkpoints_after_stage"] = True
    if args.zero_stage is not None:
        changes["deepspeed"] = replace(config.deepspeed, zero_stage=args.zero_stage)
    return replace(config, **changes)


def run(config: TrainConfig, data_files: Sequence[Path], argv: list[str] | None = None) -> Path:
    from trainer.loop import run_stage

    config = parse_overrides(config, sys.argv[1:] if argv is None else argv)
    return run_stage(config, lambda c: build_task(c, data_files))
