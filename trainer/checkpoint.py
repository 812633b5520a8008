"""Run directories, atomic resumable checkpoints, and the hand-off of weights from one stage to the next.

    runs/<stage>/
        checkpoints/step_00000120/     model + optimizer (DeepSpeed shards or one file), trainer_state.json, rng_rank{r}.pt
        checkpoints/latest             name of the newest complete checkpoint
        metrics.jsonl  log.txt  generations.jsonl
        .lock                          held (flock) by the process training the stage, released when it ends
        model.safetensors  model_config.json  stage.json     written when the stage completes: the next stage starts here

A checkpoint is written into `<name>.partial/` and renamed when every rank has finished, so a crash at any moment leaves
the previous checkpoint intact. Restarting the same command resumes from `latest`; while a run trains the stage, a
second one stops with an error naming the first (RunDir.lock).
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from model import ModelConfig, load_weights, save_weights
from trainer.config import STAGE_ORDER
from trainer.errors import InputError

FINAL_WEIGHTS = "model.safetensors"
FINAL_CONFIG = "model_config.json"
STAGE_DONE = "stage.json"


@dataclass
class TrainerState:
    """Where the run is: enough to continue exactly, without replaying data."""
    step: int = 0              # optimizer updates done
    epoch: int = 0
    file_index: int = 0        # index into the stage's data files
    batch_index: int = 0       # micro-batches of this file already consumed (per rank)
    tokens_seen: int = 0
    nonfinite_skipped: int = 0
    world_size: int = 1
    micro_batch_size: int = 1
    grad_accum_steps: int = 1


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": np_state[1].tolist(), "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                       "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunDir:
    def __init__(self, run_root: str | Path, stage: str):
        self.path = Path(run_root) / stage
        self.stage = stage
        self.checkpoints = self.path / "checkpoints"
        self._lock_file = None

    def create(self) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    # --- one run at a time ---
    def lock(self) -> str | None:
        """Hold the run dir's lock while this process trains the stage; returns None, or who holds it already.

        flock: the kernel releases it when the process ends, however it ends (kill -9 included), so no stale lock."""
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / ".lock", "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            return holder
        f.truncate(0)
        f.write(f"PID {os.getpid()} on {socket.gethostname()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        self._lock_file = f
        return None

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # --- resumable checkpoints ---
    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoints / "latest"
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        path = self.checkpoints / name
        if not (path / "trainer_state.json").exists():
            raise InputError(f"{pointer} names {name!r}, but {path} is not a complete checkpoint. Delete {pointer} to "
                             f"start over, or point it at an existing checkpoint directory in {self.checkpoints}")
        return path

    def save_checkpoint(self, backend, state: TrainerState, keep_last: int) -> Path:
        """Collective: every rank calls it. Raises if anything fails to save."""
        name = f"step_{state.step:08d}"
        final, partial = self.checkpoints / name, self.checkpoints / (name + ".partial")
        if backend.info.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        backend.barrier()
        backend.save(partial)
        torch.save(rng_state(), partial / f"rng_rank{backend.info.rank}.pt")
        backend.barrier()
        if backend.info.is_main:
            write_json_atomic(partial / "trainer_state.json", asdict(state))
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            tmp = self.checkpoints / "latest.tmp"
            tmp.write_text(name)
            os.replace(tmp, self.checkpoints / "latest")
            self.prune_checkpoints(keep_last)
        backend.barrier()
        return final

    def prune_checkpoints(self, keep_last: int) -> None:
        """Delete all but the newest keep_last complete checkpoints (0: keep all). Main rank only."""
        done = sorted(p for p in self.checkpoints.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
        for old in done[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)

    def load_checkpoint(self, backend, path: Path) -> TrainerState:
        with open(path / "trainer_state.json", encoding="utf-8") as f:
            state = TrainerState(**json.load(f))
        backend.load(path)
        rng_file = path / f"rng_rank{backend.info.rank}.pt"
        if not rng_file.exists():
            raise InputError(f"{rng_file} is missing: the checkpoint was written by {state.world_size} processes, "
                             f"this run has {backend.info.world_size}")
        set_rng_state(torch.load(rng_file, weights_only=True))
        return state

    # --- stage completion ---
    def is_complete(self) -> bool:
        return (self.path / STAGE_DONE).exists()

    def write_final(self, state_dict: dict, model_config: ModelConfig, summary: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        save_weights(state_dict, self.path / FINAL_WEIGHTS)
        write_json_atomic(self.path / FINAL_CONFIG, asdict(model_config))
        write_json_atomic(self.path / STAGE_DONE, summary)


def previous_stage(stage: str) -> str | None:
    if stage not in STAGE_ORDER:
        raise InputError(f"unknown stage {stage!r}; stages are {', '.join(STAGE_ORDER)}")
    i = STAGE_ORDER.index(stage)
    return STAGE_ORDER[i - 1] if i > 0 else None


def resolve_init_weights(init_from: str | None, stage: str, run_root: str | Path) -> Path | None:
    """'auto' -> the previous stage's consolidated weights; a file or run dir -> its weights; None -> random init."""
    if init_from is None:
        return None
    if init_from == "auto":
        prev = previous_stage(stage)
        if prev is None:
            return None
        weights = Path(run_root) / prev / FINAL_WEIGHTS
        if not weights.exists():
            raise InputError(
                f"stage {stage!r} starts from the weights of stage {prev!r}, but {weights} does not exist. Run "
                f"train_{prev}.py first, or set init_from in utils.py (or --init-from) to a .bin/.safetensors file "
                f"such as a published Cortex checkpoint")
        return weights
    path = Path(init_from)
    if path.is_dir():
        path = path / FINAL_WEIGHTS
    if not path.exists():
        raise InputError(f"init weights {init_from!r} not found (expected a .bin or .safetensors file, or a "
                         f"stage run dir holding {FINAL_WEIGHTS})")
    return path


def load_init_weights(model: torch.nn.Module, path: Path) -> None:
    """Strict: every key present with the right shape, or a clear error naming what differs."""
    load_weights(model, path)
