"""The one training loop shared by every stage.

    run_stage(config, make_task)

builds the tokenizer, data, model and backend, resumes from the run dir's latest checkpoint if there is one, trains
(gradient accumulation, lr schedule, non-finite guard, metrics, eval, checkpoints) and at the end writes the stage's
consolidated weights for the next stage. Data order is a pure function of (seed, epoch, file), so a resumed run
continues at the exact micro-batch where the checkpoint was taken, without replaying or skipping any.

Data files are opened as training reaches them (a FileDataset downloads, converts and deletes them then), so the
schedule's length is known before step 1 without every file on disk: files already on disk are counted exactly, the
first file is opened (step 1 needs it), and the others are estimated from their published sizes at the first file's
items per byte. The total is recorded in the run dir (schedule.json) at first start, so a resume uses the same
schedule; each file's micro-batch plan uses its exact length when it is reached, and training runs over all the data,
so an estimate that was short only keeps the lr at min_lr for the last steps.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from model import CortexModel, count_parameters
from trainer.activation_checkpointing import enable_activation_checkpointing
from trainer.backend import Backend, build_backend, dist_info_from_env
from trainer.checkpoint import RunDir, TrainerState, load_init_weights, resolve_init_weights, write_json_atomic
from trainer.config import TrainConfig
from trainer.errors import InputError
from trainer.metrics import MetricsLogger, RouterStats, device_peak_flops, train_flops_per_token
from trainer.schedule import WarmupCosineSchedule
from trainer.tasks import LossOutput, Task


class NonFiniteLossError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def micro_batch_plan(num_items: int, config: TrainConfig, world_size: int, rank: int, epoch: int, file_index: int,
                     shuffle: bool) -> np.ndarray:
    """Item indices of this rank's micro-batches for one file: shape (num_micro_batches, micro_batch_size).

    Every rank gets the same number of micro-batches, a multiple of grad_accum_steps, so accumulation groups never
    straddle files and collectives stay in step. The order depends only on (seed, epoch, file)."""
    order = np.arange(num_items)
    if shuffle:
        order = np.random.default_rng([config.seed, epoch, file_index]).permutation(num_items)
    mine = order[rank::world_size][:plan_length(num_items, config, world_size) * config.micro_batch_size]
    return mine.reshape(-1, config.micro_batch_size)


def plan_length(num_items: int, config: TrainConfig, world_size: int) -> int:
    """The number of micro-batches micro_batch_plan gives each rank for a file of num_items items."""
    group = config.micro_batch_size * config.grad_accum_steps
    return (num_items // world_size) // group * group // config.micro_batch_size


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _Group:
    """What one gradient-accumulation group (one optimizer update) has seen so far."""

    def __init__(self):
        self.metrics: dict[str, list[torch.Tensor]] = {}
        self.tokens, self.discarded, self.start = 0, False, time.perf_counter()
        self.mean_loss_tokens: float | None = None  # token-weighted tasks: see Trainer._mean_loss_tokens

    @property
    def empty(self) -> bool:
        return not self.metrics and self.tokens == 0 and not self.discarded

    def add(self, name: str, value: torch.Tensor) -> None:
        self.metrics.setdefault(name, []).append(value.detach().float())  # stays on the device until the step's log


class Trainer:
    def __init__(self, config: TrainConfig, make_task: Callable[[TrainConfig], Task]):
        self.config = config
        info = dist_info_from_env()
        self.run = RunDir(config.run_root, config.stage)
        self.task = make_task(config)
        self.tokenizer = self.task.tokenizer
        if self.tokenizer.vocab_size > config.model.vocab_size:
            raise InputError(f"the tokenizer has {self.tokenizer.vocab_size} ids but the model's vocab_size is "
                             f"{config.model.vocab_size}: they must match the stage config in utils.py")
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        model = CortexModel(config.model)
        init_path = resolve_init_weights(config.init_from, config.stage, config.run_root)
        self.init_path = init_path
        if init_path is not None:
            load_init_weights(model, init_path)
        if config.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.backend: Backend = build_backend(config, model)
        seed_everything(config.seed + info.rank)  # dropout and sampling differ per rank
        self.info = self.backend.info
        self.flops_per_token = train_flops_per_token(config.model, config.data.max_seq_len)
        self.peak_flops = config.peak_flops or device_peak_flops(self.backend.device)
        self.router_stats = RouterStats(self.backend.module)

    # --- data plan ---
    def _plan(self, epoch: int, file_index: int, dataset) -> np.ndarray:
        return micro_batch_plan(len(dataset), self.config, self.info.world_size, self.info.rank, epoch, file_index,
                                self.task.shuffle)

    def _file_steps(self, num_items: int) -> int:
        micro_batches = plan_length(num_items, self.config, self.info.world_size)
        return micro_batches * self.task.updates_per_batch // self.config.grad_accum_steps

    def count_steps(self) -> tuple[int, bool]:
        """(optimizer steps of the stage, whether that count is exact), opening only the first file (see top)."""
        c, task, n = self.config, self.task, len(self.task.sources)
        # Which files are on disk, decided before anything is opened (a prefetch changes it) and agreed by every rank.
        ready = [task.ready_train_dataset(i) if i > 0 else None for i in range(n)]
        on_disk = torch.tensor([1.0] + [float(d is not None) for d in ready[1:]])
        on_disk = (-self.backend.all_reduce_max(-on_disk)).tolist()
        first = task.train_dataset(0)
        items = {0: len(first)} | {i: len(ready[i]) for i in range(1, n) if on_disk[i]}
        per_file = {i: self._file_steps(k) for i, k in items.items()}
        if len(items) < n:
            items_per_byte = len(first) / max(task.source_bytes(0), 1)
            per_file |= {i: self._file_steps(round(task.source_bytes(i) * items_per_byte))
                         for i in range(n) if i not in items}
        total = sum(per_file.values()) * c.epochs
        if total < 1:
            files = ", ".join(f"{task.sources[i]} ({k} items)" for i, k in items.items())
            raise InputError(f"the stage's data gives no optimizer step: {files}; each rank needs micro_batch_size x "
                             f"grad_accum_steps = {c.micro_batch_size * c.grad_accum_steps} items of a file for one "
                             f"step ({self.info.world_size} ranks). Add data, or lower --micro-batch-size or "
                             f"--grad-accum-steps")
        return total, len(items) == n

    def _schedule_length(self) -> tuple[int, bool]:
        """count_steps at first start, recorded in the run dir and read back on a resume."""
        c = self.config
        record_path = self.run.path / "schedule.json"
        settings = {"files": self.task.sources, "epochs": c.epochs, "world_size": self.info.world_size,
                    "micro_batch_size": c.micro_batch_size, "grad_accum_steps": c.grad_accum_steps,
                    "max_seq_len": c.data.max_seq_len, "eval_fraction": c.data.eval_fraction}
        if record_path.exists():
            record = json.loads(record_path.read_text())
            if record["settings"] == settings:
                return record["total_steps"], record["exact"]
        total, exact = self.count_steps()
        if self.info.is_main:
            write_json_atomic(record_path, {"total_steps": total, "exact": exact, "settings": settings})
        return total, exact

    # --- main loop ---
    def train(self) -> Path:
        c, backend, run = self.config, self.backend, self.run
        if run.is_complete():
            if self.info.is_main:
                print(f"stage {c.stage} is already complete ({run.path}); delete that directory to train it again")
            return run.path
        holder = None
        if self.info.is_main:
            run.create()
            holder = run.lock()
        if backend.all_reduce_max(torch.tensor([float(holder is not None)]))[0] > 0:  # every rank stops
            raise InputError(f"{run.path} is being trained by {holder or 'another process (see rank 0)'}; wait for it "
                             f"to finish or stop it, then rerun")
        try:
            return self._train()
        finally:
            run.unlock()

    def _train(self) -> Path:
        c, backend, run = self.config, self.backend, self.run
        total_steps, exact = self._schedule_length()
        schedule = WarmupCosineSchedule.from_ratio(c.optim.initial_lr, c.optim.max_lr, c.optim.min_lr, total_steps,
                                                   c.optim.warmup_ratio)
        state = TrainerState(world_size=self.info.world_size, micro_batch_size=c.micro_batch_size,
                             grad_accum_steps=c.grad_accum_steps)
        latest = run.latest_checkpoint()
        if latest is not None:
            state = run.load_checkpoint(backend, latest)
            expected = (self.info.world_size, c.micro_batch_size, c.grad_accum_steps)
            if (state.world_size, state.micro_batch_size, state.grad_accum_steps) != expected:
                raise InputError(
                    f"{latest} was written with world_size={state.world_size}, micro_batch_size={state.micro_batch_size}, "
                    f"grad_accum_steps={state.grad_accum_steps}; this run has {expected}. Resume with the same settings, "
                    f"or delete {run.path} to start the stage over")

        end_step = c.max_steps or math.inf  # otherwise the data decides: total_steps may be an estimate
        self.logger = MetricsLogger(run.path, self.info.is_main, min(total_steps, end_step), state.step)
        # Records past the checkpoint are of steps this run trains again; a fresh start drops the lost attempt's all.
        self.logger.drop_records_after(state.step if latest is not None else -1)
        self.logger.text(f"stage {c.stage}: backend {backend.name}, precision {backend.precision}, "
                         f"world size {self.info.world_size}, {total_steps} optimizer steps"
                         f"{'' if exact else ' (estimated from the file sizes)'} "
                         f"({'resuming at step ' + str(state.step) if latest else 'from ' + str(self.init_path or 'random init')}), "
                         f"{count_parameters(c.model).total:,} parameters ({count_parameters(c.model).active:,} active per token)")
        eval_dataset = self.task.eval_dataset()
        if eval_dataset is not None and (len(eval_dataset) < self.info.world_size or c.data.max_eval_batches < 1):
            self.logger.text(f"no eval: {len(eval_dataset)} held-out items for {self.info.world_size} processes (each "
                             f"evaluates at least one) and max_eval_batches={c.data.max_eval_batches}; raise "
                             f"data.eval_fraction in utils.py, or mark more JSONL lines \"split\": \"eval\"")
            eval_dataset = None
        if state.step == 0 and eval_dataset is not None:
            # The baseline every later eval loss is compared with.
            self.logger.log("eval", {"step": 0, "epoch": 0, "file": 0, "batch": 0, **self.eval_metrics(eval_dataset)})
        try:
            self._train_loop(state, schedule, end_step, eval_dataset)
        finally:
            self.logger.close()
        return run.path

    def _train_loop(self, state: TrainerState, schedule: WarmupCosineSchedule, end_step: int, eval_dataset) -> None:
        c, backend = self.config, self.backend
        backend.module.train()
        self._group = _Group()
        self._consecutive_skipped = 0
        last_saved = self._first_step = state.step
        while state.epoch < c.epochs and state.step < end_step:
            while state.file_index < len(self.task.sources) and state.step < end_step:
                dataset = self.task.train_dataset(state.file_index)
                plan = self._plan(state.epoch, state.file_index, dataset)
                self.logger.text(f"epoch {state.epoch}, file {state.file_index + 1}/{len(self.task.sources)} "
                                 f"({self.task.sources[state.file_index]}): {len(plan)} micro-batches per rank, "
                                 f"starting at {state.batch_index}")
                group_batches = {}  # token-weighted tasks: the group's collated micro-batches, by plan index
                while state.batch_index < len(plan) and state.step < end_step:
                    if self.task.token_weighted and self._group.empty:  # the first micro-batch of a group
                        end = state.batch_index + c.grad_accum_steps
                        group_batches = {b: dataset.collate([dataset[int(i)] for i in plan[b]])
                                         for b in range(state.batch_index, min(end, len(plan)))}
                        self._group.mean_loss_tokens = self._mean_loss_tokens(list(group_batches.values()))
                    batch = group_batches.pop(state.batch_index, None)
                    if batch is None:
                        batch = dataset.collate([dataset[int(i)] for i in plan[state.batch_index]])
                    batch = _to_device(batch, backend.device)
                    # Usually one micro-batch per data batch; GRPO yields several updates on one rollout.
                    for micro_batch in self.task.micro_batches(batch, backend):
                        if state.step >= end_step:  # max_steps may fall among one rollout's updates
                            break
                        self._train_micro_batch(micro_batch, state, schedule, eval_dataset)
                    state.batch_index += 1
                    file_done = state.batch_index == len(plan)
                    if file_done:  # a checkpoint taken now resumes at the next file: this one is never opened again
                        state.file_index, state.batch_index = state.file_index + 1, 0
                    # Checkpoints only between data batches, at an optimizer-step boundary: resume restarts cleanly.
                    due = c.save_every_steps and state.step // c.save_every_steps > last_saved // c.save_every_steps
                    if due and self._group.empty and state.step < end_step:
                        self.run.save_checkpoint(backend, state, c.keep_last_checkpoints)
                        last_saved = state.step
                    if file_done:
                        break
                if state.batch_index >= len(plan):  # an empty plan, or a checkpoint of older versions at a file's end
                    state.file_index, state.batch_index = state.file_index + 1, 0
            if state.file_index >= len(self.task.sources):
                state.epoch, state.file_index = state.epoch + 1, 0
        self._finish(state, eval_dataset)

    def _mean_loss_tokens(self, batches: list[dict]) -> float:
        """The loss tokens of one accumulation group (this rank's collated micro-batches `batches`, all ranks), per
        micro-batch: counted from the data before the group's first backward, with one all-reduce per group.

        A token-weighted task divides each micro-batch's summed loss by this number. The backends average the
        micro-batch losses over the grad_accum_steps (A) micro-batches and the world_size (W) ranks, so the group's
        gradient is that of  sum over the group's micro-batches on all ranks of (summed loss) / (total loss tokens):
        the token mean of one big batch, where a per-micro-batch token mean would weigh a short micro-batch's
        tokens more."""
        mine = sum(self.task.loss_tokens(batch) for batch in batches)
        total = float(self.backend.all_reduce_sum(torch.tensor([float(mine)], dtype=torch.float64))[0])
        return max(total, 1.0) / (len(batches) * self.info.world_size)

    def _train_micro_batch(self, batch, state: TrainerState, schedule: WarmupCosineSchedule, eval_dataset) -> None:
        c, backend, group = self.config, self.backend, self._group
        if group.mean_loss_tokens is not None:
            batch = {**batch, "mean_loss_tokens": group.mean_loss_tokens}
        out: LossOutput = self.task.loss(backend.forward, batch)
        # Every rank must agree, or the ranks would take different collective paths.
        nonfinite = bool(backend.all_reduce_max(torch.tensor([float(not torch.isfinite(out.loss))]))[0] > 0)
        # A non-finite loss anywhere discards the whole group: its backward still runs (collectives stay matched)
        # but makes the group's gradients NaN, so that the backend's step skips it (trainer/backend.py).
        group.discarded |= nonfinite
        backend.backward(out.loss, discard=nonfinite)
        if not nonfinite:
            group.add("loss", out.loss)
            for k, v in out.metrics.items():
                group.add(k, v)
        group.tokens += out.num_tokens
        result = backend.step(schedule.lr_at(state.step))
        if result is None:
            return
        if group.discarded and not result.skipped:
            raise RuntimeError(f"backend {backend.name} applied an update whose gradients were made NaN (a non-finite "
                               f"loss): its optimizer has no overflow check, and the weights are now NaN")
        lr = schedule.lr_at(state.step)
        state.step += 1
        state.tokens_seen += group.tokens * self.info.world_size
        self._consecutive_skipped = self._consecutive_skipped + 1 if result.skipped else 0
        state.nonfinite_skipped += int(result.skipped)
        self._log_step(state, result, lr, group.metrics, group.tokens, time.perf_counter() - group.start)
        self._group = _Group()
        if self._consecutive_skipped >= c.max_consecutive_nonfinite:
            latest = self.run.latest_checkpoint()
            raise NonFiniteLossError(
                f"{self._consecutive_skipped} optimizer steps in a row skipped for a non-finite loss or gradient "
                f"(epoch {state.epoch}, file {state.file_index}, micro-batch {state.batch_index}); stopping. The last "
                f"good checkpoint is intact: {latest or 'none saved yet'}. Lower the learning rate or check the data, "
                f"then rerun the same command to resume from it")
        if c.eval_every_steps and state.step % c.eval_every_steps == 0 and eval_dataset is not None:
            self._evaluate(state, eval_dataset)
        self._group.start = time.perf_counter()  # eval time is not training time

    def _log_step(self, state, result, lr, group_metrics, group_tokens, elapsed) -> None:
        names = sorted(group_metrics)
        means = torch.stack([torch.stack(group_metrics[k]).mean() for k in names]) if names else torch.zeros(0)
        means = self.backend.all_reduce_mean(means) if names else means
        tokens_per_s = group_tokens * self.info.world_size / max(elapsed, 1e-9)
        record = {"step": state.step, "epoch": state.epoch, "file": state.file_index, "batch": state.batch_index,
                  **{k: float(v) for k, v in zip(names, means)}, "lr": lr, "grad_norm": result.grad_norm,
                  "tokens_per_s": round(tokens_per_s, 1), "tokens_seen": state.tokens_seen}
        if self.peak_flops:
            record["mfu"] = tokens_per_s * self.flops_per_token / (self.peak_flops * self.info.world_size)
        if result.skipped:
            record["skipped_nonfinite"] = True
        record["nonfinite_total"] = state.nonfinite_skipped
        if state.step % self.config.log_every_steps == 0 or result.skipped:  # the same decision on every rank
            record.update(self.router_stats.summary(self.backend.all_reduce_sum))  # since the last logged step
            self.logger.log("train", record)
        self.logger.advance(1, {"loss": record.get("loss", float("nan")), "lr": lr})

    @torch.no_grad()
    def eval_metrics(self, eval_dataset) -> dict[str, float]:
        """The task's held-out metrics (Task.eval_metrics), an item-weighted mean over up to max_eval_batches
        micro-batches per rank; every rank gets the same number of items (at least one: see train) and of batches, the
        last one smaller when the held-out split does not fill it. {"eval_loss": the task's eval_loss_metric,
        "eval_<name>": the others}."""
        c, backend, world = self.config, self.backend, self.info.world_size
        per_rank = min(len(eval_dataset), c.data.max_eval_batches * c.micro_batch_size * world) // world
        backend.module.eval()
        try:
            per_batch, sizes = [], []
            for b in range(0, per_rank, c.micro_batch_size):
                size = min(c.micro_batch_size, per_rank - b)  # batch b // micro_batch_size holds world x size items
                start = b * world + self.info.rank * size
                batch = _to_device(eval_dataset.collate([eval_dataset[i] for i in range(start, start + size)]),
                                   backend.device)
                per_batch.append(self.task.eval_metrics(batch, backend))
                sizes.append(size)
        finally:
            backend.module.train()
        names = sorted(per_batch[0])
        weights = torch.tensor(sizes, dtype=torch.float32) / per_rank
        means = backend.all_reduce_mean(torch.stack([(torch.stack([m[k].float().cpu() for m in per_batch]) * weights).sum()
                                                     for k in names]))
        values = dict(zip(names, means.tolist()))
        key = self.task.eval_loss_metric
        return {("eval_loss" if k == key else f"eval_{k}"): v for k, v in values.items()}

    def _evaluate(self, state: TrainerState, eval_dataset) -> None:
        record = {"step": state.step, "epoch": state.epoch, "file": state.file_index, "batch": state.batch_index,
                  **self.eval_metrics(eval_dataset)}
        self.logger.log("eval", record)
        self._sample_generations(state)

    def _sample_generations(self, state: TrainerState) -> None:
        prompts = self.task.eval_prompts()[:self.config.max_sample_prompts] if self.config.samples else []
        if not prompts:
            return
        from model import generate

        c = self.config
        # Same seed on every rank: identical sequences, so ZeRO-3's collectives stay matched.
        generator = torch.Generator(device=self.backend.device).manual_seed(c.seed + state.step)
        with self.backend.generation_model() as model:
            for text, ids in prompts:
                new_ids = generate(model, ids, max_new_tokens=c.eval_max_new_tokens, temperature=0.7, top_p=0.95,
                                   stop_token_ids=[self.tokenizer.eos_id], generator=generator)
                completion = self.tokenizer.decode(new_ids)
                self.logger.generation({"step": state.step, "prompt": text, "completion": completion})

    def _finish(self, state: TrainerState, eval_dataset) -> None:
        c, backend = self.config, self.backend
        evaluated_now = c.eval_every_steps and state.step % c.eval_every_steps == 0
        # Resumed from the final checkpoint (killed before the weights were written): its eval is logged already.
        if eval_dataset is not None and not evaluated_now and state.step > self._first_step:
            self._evaluate(state, eval_dataset)
        self.run.save_checkpoint(backend, state, c.keep_last_checkpoints)
        weights = backend.full_state_dict()
        if self.info.is_main:
            summary = {"stage": c.stage, "steps": state.step, "epochs": c.epochs, "tokens_seen": state.tokens_seen,
                       "nonfinite_skipped": state.nonfinite_skipped, "init_from": str(self.init_path) if self.init_path else None,
                       "backend": backend.name, "precision": backend.precision, "world_size": self.info.world_size,
                       "train_config": _jsonable(asdict(c))}
            self.run.write_final(weights, c.model, summary)
            if not c.keep_checkpoints_after_stage:  # the stage is done: its older ZeRO checkpoints are dead weight
                self.run.prune_checkpoints(keep_last=1)
            self.logger.text(f"stage {c.stage} complete: weights in {self.run.path}")
        backend.barrier()


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj if isinstance(obj, (str, int, float, bool)) or obj is None else str(obj)


def run_stage(config: TrainConfig, make_task: Callable[[TrainConfig], Task]) -> Path:
    trainer = Trainer(config, make_task)
    try:
        return trainer.train()
    finally:
        trainer.backend.close()
