"""GPU check: every training stage and the chat server on one GPU, in at most 8 minutes, as JSON lines.

    bash bench/gpu_check.sh                 # full Cortex 2.5 config, bf16, on the visible GPU
    bash bench/gpu_check.sh --profile       # also torch.profiler's top-ops table of one seq-2048 step (on stderr)
    bash bench/gpu_check.sh --smoke         # the same code path on CPU with the tiny preset (CI runs it)

Parts, in order, each a JSON line on stdout (logs and tables go to stderr):
  env                          device, versions, peak FLOP/s used for MFU
  <stage>/<backend>            a few optimizer steps of pretrain_stage0 (seq 512), pretrain_stage1 (seq 2048), mix
                               (SFT), grpo (GSPO) and dpo through the real training loop (trainer/loop.py), with the
                               stage's config from utils.py (micro-batch, accumulation, model), random weights and
                               synthetic token files in our .npy format; backend single (one device), zero2 or zero3
                               (DeepSpeed, one rank, in-process). Reports tokens/s and MFU (median of the steps after
                               the first), per-step losses and peak memory.
  profile/pretrain_stage1      (--profile) one seq-2048 step of the single backend under torch.profiler
  serve/eager, serve/compile   decode tokens/s of the chat server's engine (serving/engine.py) at batch 1 and 8

Differences from a real run, so that it fits the time and needs no download: no eval, sample generations, checkpoints
or final weights; no CPU offload (the GSPO recipe offloads for 24 GB cards); GSPO completions are capped at
GRPO_MAX_NEW_TOKENS; the tiny BPE tokenizer only names the special tokens (token ids are random).

Every part runs in a worker process and fails soft: an error or a part over its time budget is reported in its line
and the next part runs (in a fresh worker when the old one had to be killed). The soft budget stops a part taking new
steps; twice the budget, or the end of the total budget, stops the worker.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

STAGES = ("pretrain_stage0", "pretrain_stage1", "mix", "grpo", "dpo")
BACKENDS = {"single": ("single", None), "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3)}
# Soft time budget of each part in seconds (setup included), sized for an H100 with room to spare.
BUDGET_S = {"env": 30, "pretrain_stage0": 25, "pretrain_stage1": 25, "mix": 30, "grpo": 40, "dpo": 30,
            "profile": 40, "serve/eager": 40, "serve/compile": 150}
TOTAL_BUDGET_S = 480
MFU_TARGET = 0.35              # bf16 at seq 2048 on an H100/H200 (issue 13)
IMPORT_ALLOWANCE_S = 60        # a fresh worker imports torch, DeepSpeed and transformers before its first part
GRPO_MAX_NEW_TOKENS = 256      # the recipe's 1024 would spend most of the check in eager rollouts
SERVE_BATCHES = (1, 8)
SERVE_NEW_TOKENS = {"gpu": 256, "smoke": 16}
STEPS = {"gpu": 4, "smoke": 2}  # optimizer steps per training part; the first is warm-up
SMOKE_MICRO_BATCH = 2


def part_names(profile: bool) -> list[str]:
    train = [f"{stage}/{backend}" for backend in BACKENDS for stage in STAGES]
    return ["env", *train, *(["profile/pretrain_stage1"] if profile else []), "serve/eager", "serve/compile"]


def budget_of(part: str) -> float:
    return BUDGET_S[part] if part in BUDGET_S else BUDGET_S[part.split("/")[0]]  # mix/zero3 -> mix


# ----------------------------------------------------------------------------------------------------------------------
# The parent: runs the parts in worker processes, enforces the budgets, prints one JSON line per part

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset, 2 steps per part (for CI)")
    parser.add_argument("--profile", action="store_true", help="add a profiled seq-2048 step (table on stderr)")
    parser.add_argument("--parts", nargs="+", help="run only these parts (names as printed, e.g. mix/zero3)")
    parser.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="total time budget (default 480 s)")
    parser.add_argument("--peak-flops", type=float, help="device peak FLOP/s for MFU (default: known GPUs, bf16 dense)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="train with per-layer checkpointing")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: run parts, sharing this temp dir
    args = parser.parse_args()
    parts = args.parts or part_names(args.profile)
    if args.profile and "profile/pretrain_stage1" not in parts:
        parts = [*parts, "profile/pretrain_stage1"]
    if args.worker:
        return worker(parts, args.smoke, args.peak_flops, args.activation_checkpointing, args.worker)
    known = set(part_names(profile=True))
    unknown = [p for p in parts if p not in known]
    if unknown:
        parser.error(f"unknown parts {unknown}; the parts are: {' '.join(sorted(known))}")
    start = time.monotonic()
    deadline = start + args.budget_s
    results, pending = [], list(parts)
    flags = [*(["--smoke"] if args.smoke else []), *(["--peak-flops", str(args.peak_flops)] if args.peak_flops else []),
             *(["--activation-checkpointing"] if args.activation_checkpointing else [])]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:  # synthetic data, reused by a restarted worker
        while pending:
            if time.monotonic() >= deadline:
                results += [emit({"part": p, "ok": False, "error": f"not run: the total budget of "
                                                                   f"{args.budget_s:.0f} s was spent"}) for p in pending]
                break
            results += run_worker(pending, [*flags, "--worker", tmp], deadline)
    ok = [r for r in results if r["ok"]]
    mfu_2048 = {r["part"]: r["mfu"] for r in ok if r["part"].startswith("pretrain_stage1/") and r["mfu"] is not None}
    emit({"part": "summary", "ok": len(ok) == len(results), "parts": len(results),
          "failed": [r["part"] for r in results if not r["ok"]], "mfu_seq2048": mfu_2048,
          "mfu_target": MFU_TARGET, "mfu_target_met": min(mfu_2048.values()) >= MFU_TARGET if mfu_2048 else None,
          "wall_s": round(time.monotonic() - start, 1)})
    return 0 if len(ok) == len(results) else 1


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def run_worker(pending: list[str], flags: list[str], deadline: float) -> list[dict]:
    """Runs the pending parts in one worker until they are done, one overruns its budget or the worker dies; returns
    the records of the parts it finished (and of the one that failed it), removing them from `pending`."""
    # A session of its own, so that killing it also ends its helpers (torch.compile's compile workers).
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *flags, "--parts", *pending],
                             stdout=subprocess.PIPE, text=True, bufsize=1, cwd=REPO_ROOT, start_new_session=True)
    lines: queue.Queue = queue.Queue()

    def read():  # a thread, so the wait for a line can time out
        for line in child.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    results = []
    part_start, allowance = time.monotonic(), IMPORT_ALLOWANCE_S
    try:
        while pending:
            part = pending[0]
            limit = min(part_start + allowance + 2 * budget_of(part), deadline)
            try:
                line = lines.get(timeout=max(0.0, limit - time.monotonic()))
            except queue.Empty:
                spent = time.monotonic() - part_start
                reason = ("the total budget was spent" if limit == deadline else
                          f"over twice its budget of {budget_of(part):.0f} s")
                results.append(emit({"part": pending.pop(0), "ok": False, "wall_s": round(spent, 1),
                                     "error": f"stopped after {spent:.0f} s: {reason}"}))
                return results
            if line is None:
                code = child.wait()
                results.append(emit({"part": pending.pop(0), "ok": False, "error": f"the worker process ended (exit "
                                     f"code {code}) during this part; its log is above on stderr"}))
                return results
            log, record = _json_record(line)
            if record is not None and record.get("part") == part:
                sys.stderr.write(f"{log}\n" if log else "")
                results.append(emit(record))
                pending.pop(0)
                part_start, allowance = time.monotonic(), 0
            else:
                sys.stderr.write(line)
        return results
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def _json_record(line: str) -> tuple[str, dict | None]:
    """(what precedes it, a worker's part record): the record also when a log without a final newline ran into it;
    (line, None) for other lines."""
    start = line.find('{"part": ')
    if start < 0:
        return line, None
    try:
        return line[:start], json.loads(line[start:])
    except json.JSONDecodeError:  # a log line that merely contains the marker
        return line, None


# ----------------------------------------------------------------------------------------------------------------------
# The worker: runs parts in order, one JSON line each

def worker(parts: list[str], smoke: bool, peak_flops: float | None, checkpointing: bool, tmp: Path) -> int:
    import torch

    context = Context(smoke, peak_flops, checkpointing, tmp)
    for part in parts:
        start = time.perf_counter()
        try:
            record = {"part": part, "ok": True, **run_part(part, context, start + budget_of(part))}
        except Exception as e:  # fail soft: the error goes into the part's line, the traceback to stderr
            traceback.print_exc()
            record = {"part": part, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        record["wall_s"] = round(time.perf_counter() - start, 1)
        context.release_memory()
        print(json.dumps(record), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


class Context:
    """What the parts of one worker share: the mode, a temp dir, the synthetic data and init weights written so far."""

    def __init__(self, smoke: bool, peak_flops: float | None, checkpointing: bool, tmp: Path):
        from trainer.backend import pick_device
        from trainer.metrics import device_peak_flops

        self.smoke, self.checkpointing, self.tmp = smoke, checkpointing, tmp
        self.device = pick_device()
        self.peak_flops = peak_flops or device_peak_flops(self.device)
        self.steps = STEPS["smoke" if smoke else "gpu"]
        self.cuda = self.device.type == "cuda"
        self.allocated_at_start = 0

    def release_memory(self) -> None:
        """Frees what the last part left and starts the peak-memory count of the next one."""
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.allocated_at_start = torch.cuda.memory_allocated()

    def data_file(self, config, tokenizer) -> Path:
        path = self.tmp / "data" / f"{config.stage}.npy"
        done = path.with_name(path.name + ".done")
        if not done.exists():  # written once, also for a worker restarted after a failed part
            write_synthetic_data(path, config, tokenizer, self.steps)
            done.touch()
        return path

    def init_weights(self, model_config) -> Path:
        """Random weights as a file: DPO's frozen reference is built from the stage's init weights."""
        path = self.tmp / "init.safetensors"
        if not path.exists():
            from model import CortexModel, save_weights

            partial = save_weights(CortexModel(model_config), path.with_name("init.partial.safetensors"))
            partial.rename(path)  # complete or absent, also when a part over its budget is killed
        return path


def run_part(part: str, context: Context, deadline: float) -> dict:
    if part == "env":
        return env_record(context)
    if not context.smoke and not context.cuda:
        raise RuntimeError("no CUDA device is visible: the GPU check needs one (--smoke runs its code path on a CPU)")
    if part.startswith("serve/"):
        return serve_part(context, compile=part == "serve/compile")
    if part.startswith("profile/"):
        return train_part(context, "pretrain_stage1", "single", deadline, profile=True)
    stage, backend = part.split("/")
    return train_part(context, stage, backend, deadline)


def env_record(context: Context) -> dict:
    import torch

    record = {"device": str(context.device), "smoke": context.smoke, "torch": torch.__version__,
              "cuda": torch.version.cuda, "peak_flops": context.peak_flops}
    try:
        import deepspeed
        record["deepspeed"] = deepspeed.__version__
    except ImportError as e:
        record["deepspeed"] = f"not importable: {e}"
    if context.cuda:
        props = torch.cuda.get_device_properties(context.device)
        record |= {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                   "bf16": torch.cuda.is_bf16_supported()}
    return record


def memory_record(context: Context) -> dict:
    import torch

    if not context.cuda:
        return {"peak_allocated_gb": None, "peak_reserved_gb": None}
    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "allocated_at_start_gb": round(context.allocated_at_start / 2**30, 2)}  # left over by earlier parts


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic token files in our .npy format (trainer/token_files.py)

def write_synthetic_data(path: Path, config, tokenizer, steps: int) -> None:
    """Enough random-token items for `steps` optimizer steps (+1 spare) of the stage. SFT and DPO items fill
    max_seq_len: the recipe's worst case for memory."""
    import numpy as np

    from trainer.token_files import save_collection, save_stream

    rng = np.random.default_rng(0)
    t = tokenizer
    special = [t.eos_id, t.pad_id, t.unk_id, t.user_id, t.assistant_id, t.system_id, t.think_id, t.think_end_id,
               t.answer_id, t.answer_end_id]
    regular = np.setdiff1d(np.arange(t.vocab_size), special)
    seq, vocab = config.data.max_seq_len, t.vocab_size
    batches = steps + 1
    if config.task == "grpo":
        batches = math.ceil(steps / (config.grpo.grpo_steps * config.grad_accum_steps)) + 1
    items = config.micro_batch_size * config.grad_accum_steps * batches

    def text(n: int) -> list[int]:
        return rng.choice(regular, n).tolist()

    def prompt(user_len: int) -> list[int]:
        return [t.system_id, *text(4), t.eos_id, t.user_id, *text(user_len), t.eos_id]

    if config.task == "pretrain":
        tokens = rng.choice(regular, items * seq)
        ends = np.cumsum(rng.integers(100, 1000, len(tokens) // 100))  # documents of 100 to 1000 tokens
        tokens[ends[ends < len(tokens)]] = t.eos_id
        save_stream(path, tokens, vocab)
        return

    def conversation(head: list[int]) -> list[int]:
        return [*head, t.assistant_id, *text(seq - len(head) - 2), t.eos_id]

    if config.task == "sft":
        save_collection(path, "sft", {None: [conversation(prompt(seq // 8)) for _ in range(items)]}, vocab)
    elif config.task == "dpo":
        heads = [prompt(seq // 8) for _ in range(items)]
        save_collection(path, "dpo", {"chosen": [conversation(h) for h in heads],
                                      "rejected": [conversation(h) for h in heads]}, vocab)
    else:  # grpo: prompts short enough for max_new_tokens, answers as token ids (decoded by the dataset)
        user_len = max(1, min(48, seq - config.grpo.max_new_tokens - 12))
        save_collection(path, "grpo", {"prompt": [prompt(user_len) for _ in range(items)],
                                       "answer": [t.encode(str(rng.integers(100))) for _ in range(items)]}, vocab)


# ----------------------------------------------------------------------------------------------------------------------
# Training parts: the real loop (trainer/loop.py) for a few steps

class BudgetSpent(Exception):
    pass


@functools.cache
def check_trainer_class():
    from trainer.loop import Trainer

    class CheckTrainer(Trainer):
        """The real loop, minus what ends a stage (final eval, samples, checkpoint, weights: not measured here); stops
        taking steps once the part's budget is spent; profiles one step when asked."""
        deadline = math.inf
        profile_step: int | None = None  # the optimizer step (1-based) to profile
        profiler = None
        steps_done = 0

        def _log_step(self, *args, **kwargs):
            super()._log_step(*args, **kwargs)
            self.steps_done += 1
            if self.profiler is not None and self.steps_done == self.profile_step:
                stop_profiler(self.profiler, self.backend.device)
            if time.perf_counter() > self.deadline:
                raise BudgetSpent
            if self.profile_step is not None and self.steps_done == self.profile_step - 1:
                self.profiler = start_profiler(self.backend.device)

        def _finish(self, *args, **kwargs):
            pass

    return CheckTrainer


def part_config(context: Context, stage: str, backend: str, run_root: Path):
    import utils

    config = utils.stage_config(stage, preset="tiny" if context.smoke else "full")
    name, zero_stage = BACKENDS[backend]
    deepspeed = replace(config.deepspeed, zero_stage=zero_stage or config.deepspeed.zero_stage,
                        offload_optimizer=False, offload_param=False)
    config = replace(config, backend=name, deepspeed=deepspeed, tokenizer="tiny", run_root=str(run_root),
                     init_from=None, max_steps=context.steps, eval_every_steps=0, save_every_steps=0, eval_prompts=[],
                     log_every_steps=1, data=replace(config.data, files=[], jsonl_files=[], eval_fraction=0.0),
                     precision="bf16" if context.cuda else config.precision, peak_flops=context.peak_flops,
                     activation_checkpointing=context.checkpointing)
    if context.smoke:  # seconds, not minutes, on a CI machine's CPU
        config = replace(config, micro_batch_size=min(config.micro_batch_size, SMOKE_MICRO_BATCH))
    elif stage == "grpo":
        config = replace(config, grpo=replace(config.grpo, max_new_tokens=GRPO_MAX_NEW_TOKENS))
    if stage == "dpo":
        config = replace(config, init_from=str(context.init_weights(config.model)))
    return config


def train_part(context: Context, stage: str, backend: str, deadline: float, profile: bool = False) -> dict:
    from trainer.cli import build_task
    from trainer.memory_plan import estimate
    from trainer.metrics import read_metrics, train_flops_per_token
    from trainer.tokenizer import tiny_tokenizer

    run_root = Path(tempfile.mkdtemp(prefix="runs_", dir=context.tmp))
    config = part_config(context, stage, backend, run_root)
    if profile:
        config = replace(config, max_steps=context.steps + 1)
    data = [context.data_file(config, tiny_tokenizer())]
    context.release_memory()
    start = time.perf_counter()
    trainer = check_trainer_class()(config, lambda c: build_task(c, data))
    setup_s = time.perf_counter() - start
    trainer.deadline = deadline
    trainer.profile_step = config.max_steps if profile else None
    budget_spent = False
    try:
        trainer.train()
    except BudgetSpent:
        budget_spent = True
    finally:
        # Not backend.close(): DeepSpeed (0.19) caches its process groups and cannot initialise again in this process
        # once the group is destroyed, so the group lives as long as the worker; the engine releases its hooks here.
        engine = getattr(trainer.backend, "engine", None)
        if engine is not None:
            engine.destroy()
    records = read_metrics(run_root / config.stage / "metrics.jsonl")
    if not records:
        raise RuntimeError(f"{stage}/{backend}: no optimizer step finished within the budget")
    measured = records[1:] or records  # the first step warms up kernels and allocator
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in measured)
    flops_per_token = train_flops_per_token(config.model, config.data.max_seq_len)
    seen = [0] + [r["tokens_seen"] for r in records]  # cumulative: each step's own tokens are the differences
    plan = estimate(config, 1, device=context.device.type)  # what --plan predicts, to set against the measured peak
    record = {
        "stage": stage, "backend": trainer.backend.name, "zero_stage": BACKENDS[backend][1],
        "precision": trainer.backend.precision, "activation_checkpointing": config.activation_checkpointing,
        "seq_len": config.data.max_seq_len,
        "micro_batch_size": config.micro_batch_size, "grad_accum_steps": config.grad_accum_steps,
        "steps": len(records), "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(tokens_per_s * flops_per_token / context.peak_flops, 4) if context.peak_flops else None,
        "model_flops_per_token": flops_per_token, "loss": [r.get("loss") for r in records],
        "step_s": [round((b - a) / r["tokens_per_s"], 3) for a, b, r in zip(seen, seen[1:], records)],
        "setup_s": round(setup_s, 1), "budget_spent": budget_spent, **memory_record(context),
        "plan_gb": round((plan.total_checkpointed if config.activation_checkpointing else plan.total) / 2**30, 2)}
    if stage == "grpo":
        record |= {"max_new_tokens": config.grpo.max_new_tokens,
                   "rollout_tokens_per_s": records[0].get("gen_tokens_per_s")}
    if trainer.profiler is not None:
        record["top_ops"] = top_ops(trainer.profiler, context.device)
    return record


# ----------------------------------------------------------------------------------------------------------------------
# Profiler (--profile)

def start_profiler(device):
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    profiler.start()
    return profiler


def stop_profiler(profiler, device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    profiler.stop()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"torch.profiler: one optimizer step, ops by {sort}", flush=True)
    print(profiler.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70), flush=True)


def top_ops(profiler, device, count: int = 10) -> list[dict]:
    """The ops with the most self time in the profiled step (on a GPU: the kernel time they launched), with their
    share of the ops' total. Kernel rows are left out: their time is already their op's."""
    from torch.autograd import DeviceType

    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in profiler.key_averages() if e.device_type == DeviceType.CPU and getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"op": e.key, "self_ms": round(getattr(e, attr) / 1e3, 3), "share": round(getattr(e, attr) / total, 4),
             "calls": e.count} for e in events[:count]]


# ----------------------------------------------------------------------------------------------------------------------
# Serving: decode tokens/s of the chat server's engine

def serve_part(context: Context, compile: bool) -> dict:
    import torch

    from model import CortexModel, cortex_2_5_config, tiny_config
    from serving.checkpoint import pick_format
    from serving.engine import Engine, Finished, GenerationRequest, SamplingParams
    from trainer.tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer.vocab_size, long_context=True) if context.smoke else cortex_2_5_config(True)
    context.release_memory()
    torch.manual_seed(0)
    dtype, _ = pick_format(None, "none", context.device)  # as app.py: bf16 on CUDA
    model = CortexModel(config).to(context.device, dtype).eval()
    start = time.perf_counter()
    engine = Engine(model, tokenizer, slots=max(SERVE_BATCHES), seed=0, compile=compile).start()
    compile_s = time.perf_counter() - start
    new_tokens = SERVE_NEW_TOKENS["smoke" if context.smoke else "gpu"]
    prompt = [tokenizer.system_id, tokenizer.eos_id, tokenizer.user_id, *range(20, 52), tokenizer.eos_id,
              tokenizer.assistant_id]

    def generate(batch: int, max_new_tokens: int) -> tuple[int, float]:
        begin = time.perf_counter()
        requests = [engine.submit(GenerationRequest(prompt, SamplingParams(0.8, 0.95, max_new_tokens), thinking=False))
                    for _ in range(batch)]
        tokens = 0
        for request in requests:
            while not isinstance(event := request.events.get(timeout=600), Finished):
                pass
            if event.reason not in ("stop", "length"):
                raise RuntimeError(f"a generation ended with {event.reason!r} (the engine logged why on stderr)")
            tokens += event.completion_tokens
        return tokens, time.perf_counter() - begin

    try:
        generate(1, 8)  # warm-up: kernels, allocator
        record = {"device": str(context.device), "dtype": str(dtype).replace("torch.", ""),
                  "compile": compile, "compile_s": round(compile_s, 1) if compile else None,
                  "max_new_tokens": new_tokens}
        for batch in SERVE_BATCHES:
            tokens, seconds = generate(batch, new_tokens)
            record[f"batch{batch}_tokens_per_s"] = round(tokens / seconds, 1)
            record[f"batch{batch}_tokens"] = tokens
    finally:
        engine.stop()
    return {**record, **memory_record(context)}


if __name__ == "__main__":
    sys.exit(main())
