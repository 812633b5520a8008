"""Command line of the stage scripts: `python3 train_x.py [--max-steps N] [--init-from PATH] ...`.

The stage's settings come from utils.py; these flags only override a few of them for one run.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from file_dataset import FileDataset
from trainer.config import TrainConfig
from trainer.dpo import DPOTask
from trainer.grpo import GRPOTask
from trainer.tasks import LanguageModelingTask, Task
from trainer.tokenizer import get_tokenizer


DataFiles = Sequence[Path] | FileDataset  # local files, or ModelScope files fetched as training reaches them


def build_task(config: TrainConfig, data_files: DataFiles) -> Task:
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
    parser.add_argument("--data-dir", help="where the stage's data files are downloaded to (default: CORTEX_DATA_DIR "
                                           "or ./data)")
    parser.add_argument("--dataset-id", help="the ModelScope dataset they come from (default: CORTEX_DATASET_ID or "
                                             "qibin0506/Cortex-2.5-train-data)")
    parser.add_argument("--delete-consumed-files", action=argparse.BooleanOptionalAction,
                        help="delete each data file once training is past it (the first stays: it holds the held-out "
                             "split); a second epoch downloads them again")
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
    data_changes = {name: getattr(args, name) for name in ("data_dir", "dataset_id", "delete_consumed_files")
                    if getattr(args, name) is not None}
    if data_changes:
        changes["data"] = replace(config.data, **data_changes)
    if args.zero_stage is not None:
        changes["deepspeed"] = replace(config.deepspeed, zero_stage=args.zero_stage)
    return replace(config, **changes)


def run(config: TrainConfig, data_files: DataFiles | Callable[[TrainConfig], DataFiles], argv: list[str] | None = None
        ) -> Path:
    """Train the stage; data_files may be a function of the config, called once the flags are applied."""
    from trainer.loop import run_stage

    config = parse_overrides(config, sys.argv[1:] if argv is None else argv)
    files = data_files(config) if callable(data_files) else data_files
    return run_stage(config, lambda c: build_task(c, files))
