"""Command line of the stage scripts: `python3 train_x.py [--max-steps N] [--init-from PATH] ...`.

The stage's settings come from utils.py; these flags only override a few of them for one run. `--plan` prints the
memory the stage needs per GPU and the global batch and learning rates it implies, and trains nothing. A data or
settings error (trainer/errors.py) ends the script with one line on the console and exit status 2; its traceback goes to
the run's log.txt.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from file_dataset import FileDataset
from model import WeightsMismatchError
from trainer.config import TrainConfig, fit_global_batch
from trainer.dpo import DPOTask
from trainer.errors import InputError
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


def parse_overrides(config: TrainConfig, argv: list[str]) -> tuple[TrainConfig, argparse.Namespace]:
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
    parser.add_argument("--max-eval-batches", type=int, help="each eval covers at most this many micro-batches per rank "
                                                             "of the held-out split (a smoke run's evals then stay short)")
    parser.add_argument("--no-samples", action="store_true", help="no sample generations at evals and the stage's end")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="a completed stage keeps all its checkpoints (default: only the last, beside the weights)")
    parser.add_argument("--data-dir", help="where the stage's data files are downloaded to (default: CORTEX_DATA_DIR "
                                           "or ./data)")
    parser.add_argument("--dataset-id", help="the ModelScope dataset they come from (default: CORTEX_DATASET_ID or "
                                             "qibin0506/Cortex-2.5-train-data)")
    parser.add_argument("--delete-consumed-files", action=argparse.BooleanOptionalAction,
                        help="delete each data file once training is past it (the first stays: it holds the held-out "
                             "split); a second epoch downloads them again")
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                        help="recompute each layer's activations in backward: less memory, about a third more compute")
    parser.add_argument("--plan", action="store_true", help="print the memory per GPU, global batch and learning rates "
                                                            "of this stage, and exit without training")
    parser.add_argument("--world-size", type=int, help="--plan: the number of GPUs (default: the visible ones)")
    parser.add_argument("--json", action="store_true", help="--plan: print JSON")
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
                 "seed", "activation_checkpointing"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.no_samples:
        changes["samples"] = False
    if args.keep_checkpoints:
        changes["keep_checkpoints_after_stage"] = True
    data_changes = {name: getattr(args, name) for name in ("data_dir", "dataset_id", "delete_consumed_files",
                                                           "max_eval_batches")
                    if getattr(args, name) is not None}
    if data_changes:
        changes["data"] = replace(config.data, **data_changes)
    if args.zero_stage is not None:
        changes["deepspeed"] = replace(config.deepspeed, zero_stage=args.zero_stage)
    if (args.world_size is not None or args.json) and not args.plan:
        parser.error("--world-size and --json go with --plan")
    if args.world_size is not None and args.world_size < 1:
        parser.error(f"--world-size must be at least 1, got {args.world_size}")
    return replace(config, **changes), args


def run(config: TrainConfig, data_files: DataFiles | Callable[[TrainConfig], DataFiles], argv: list[str] | None = None
        ) -> Path | None:
    """Train the stage (returns its run dir), or with --plan print its memory plan (returns None); data_files may be a
    function of the config, called once the flags are applied."""
    config, args = parse_overrides(config, sys.argv[1:] if argv is None else argv)
    if args.plan:
        from trainer.memory_plan import print_plan, visible_world_size

        world_size = args.world_size or visible_world_size()
        config, note = fit_global_batch(config, world_size, keep_accumulation=args.grad_accum_steps is not None)
        print_plan(config, world_size, note, args.json)
        return None
    from trainer.loop import run_stage

    # Never silently: a world size other than the recipe's keeps its global batch or scales the lr, and says which.
    config, note = fit_global_batch(config, int(os.environ.get("WORLD_SIZE", 1)),
                                    keep_accumulation=args.grad_accum_steps is not None)
    if note and int(os.environ.get("RANK", 0)) == 0:
        print(f"stage {config.stage}: {note}", flush=True)
    files = data_files(config) if callable(data_files) else data_files
    try:
        return run_stage(config, lambda c: build_task(c, files))
    except (InputError, WeightsMismatchError) as e:  # anything else is a bug: its traceback stays on the console
        raise SystemExit(report_input_error(e, Path(config.run_root) / config.stage)) from None


def report_input_error(error: Exception, run_path: Path) -> int:
    """The error's message on the console (each rank of a multi-process run says its own), its traceback appended to
    run_path/log.txt; returns the exit status, 2."""
    log = run_path / "log.txt"
    prefix = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    run_path.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {prefix}error in PID {os.getpid()}:\n"
                + "".join(traceback.format_exception(error)))
    print(f"{prefix}error: {error} (traceback in {log})", file=sys.stderr, flush=True)
    return 2
