"""Non-finite steps really skip, on every backend: a group with a non-finite loss or gradient leaves the weights and the
optimizer state (Adam's exp_avg, exp_avg_sq and step count) exactly as they were, is counted, and repeated ones stop the
run with the last good checkpoint intact.

The real pretrain task, with its loss (or its gradients) made NaN on chosen micro-batches of chosen ranks, as an fp16
overflow or a bad batch would. Every step is checkpointed, so the states before and after a skipped group are compared
from the checkpoints the run itself wrote (DeepSpeed's own ZeRO files, or train_state.pt)."""
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import utils
from trainer.checkpoint import FINAL_WEIGHTS
from trainer.cli import get_tokenizer
from trainer.loop import NonFiniteLossError, run_stage
from trainer.metrics import read_metrics
from trainer.tasks import LanguageModelingTask

REPO = Path(__file__).resolve().parents[1]

# (rank, training micro-batch number counted from 1, what is made non-finite). With grad_accum_steps 2, micro-batches
# 3-4 make step 2 and 5-6 step 3: step 2 gets a NaN loss on its first micro-batch (rank 0), step 3 finite losses with
# NaN gradients on its last one (rank 1 when there are two ranks, so each rank once has a good loss while the other's
# is bad: they must still agree).
POISON = {(0, 3): "loss", (1, 6): "grad"}
POISON_ONE_RANK = {(0, 3): "loss", (0, 6): "grad"}


class PoisonedTask(LanguageModelingTask):
    def __init__(self, *args, poison: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.poison, self.calls, self.rank = poison, 0, int(os.environ.get("RANK", 0))

    def loss(self, forward, batch):
        out = super().loss(forward, batch)
        if torch.is_grad_enabled():  # training micro-batches only, not the eval loss
            self.calls += 1
            what = self.poison((self.rank, self.calls)) if callable(self.poison) else self.poison.get((self.rank,
                                                                                                       self.calls))
            if what == "loss":
                out.loss = out.loss * float("nan")
            elif what == "grad":
                # value unchanged (finite); d sqrt(u)/du at u = 0 is inf, times 0 is NaN in every gradient
                out.loss = out.loss + 0.0 * torch.sqrt(out.loss - out.loss.detach())
        return out


def run_poisoned(config, poison):
    return run_stage(config, lambda c: PoisonedTask(c, get_tokenizer(c.tokenizer), utils.data_files(c),
                                                    kind="pretrain", poison=poison))


def _config(run_root: Path, **changes):
    config = utils.stage_config("pretrain_stage0", preset="tiny")
    settings = dict(run_root=str(run_root), max_steps=4, eval_every_steps=0, save_every_steps=1, keep_last_checkpoints=0,
                    keep_checkpoints_after_stage=True, micro_batch_size=2, data=replace(config.data, eval_fraction=0.0))
    return replace(config, **{**settings, **changes})


def _tensors(obj, prefix="") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint structure, by key path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for key, value in items:
        out.update(_tensors(value, f"{prefix}/{key}"))
    return out


def _training_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Weights and optimizer state of a checkpoint, all ranks: DeepSpeed's files or our train_state.pt."""
    files = sorted((checkpoint / "deepspeed").glob("*.pt")) or [checkpoint / "train_state.pt"]
    state = {}
    for f in files:  # written by this test's own run
        state.update(_tensors(torch.load(f, map_location="cpu", weights_only=False), f.name))
    return state


def _check_skips(run_dir: Path) -> None:
    steps = read_metrics(run_dir / "metrics.jsonl")
    assert [s.get("skipped_nonfinite", False) for s in steps] == [False, True, True, False]
    assert steps[-1]["nonfinite_total"] == 2
    states = {k: _training_state(run_dir / "checkpoints" / f"step_{k:08d}") for k in (1, 2, 3, 4)}
    names = "\n".join(states[1])
    for part in ("exp_avg", "exp_avg_sq", "step"):  # Adam's state is there (ZeRO keeps it per rank, flattened)
        assert f"/{part}" in names, (part, names[:2000])
    for before, after in ((1, 2), (2, 3)):  # the skipped groups moved nothing: not a weight, not a moment, not a count
        assert states[before].keys() == states[after].keys()
        changed = [k for k in states[before] if not torch.equal(states[before][k], states[after][k])]
        assert not changed, (before, after, changed)
    moved = [k for k in states[3] if not torch.equal(states[3][k], states[4][k])]  # a good step moves them all
    assert any("/exp_avg_sq" in k for k in moved) and any(k.endswith("/step") for k in moved), moved
    weights = load_file(run_dir / FINAL_WEIGHTS)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_single_device_skips_nonfinite_loss_and_gradient(tmp_path):
    run_poisoned(_config(tmp_path, backend="single"), POISON_ONE_RANK)
    _check_skips(tmp_path / "pretrain_stage0")


SCRIPT = """\
import pickle, sys
sys.path.insert(0, {repo!r})
from tests.test_nonfinite import run_poisoned
run_poisoned(pickle.loads({config!r}), {poison!r})
"""


def _run_script(tmp_path: Path, config, poison: dict, processes: int) -> None:
    script = tmp_path / "poisoned.py"
    script.write_text(SCRIPT.format(repo=str(REPO), config=pickle.dumps(config), poison=poison))
    launch = [sys.executable, "-m", "trainer.launch", str(script), "--num_gpus", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-6000:])


# In this process, as `python3 train_x.py --backend deepspeed` runs: the backend sets up its one-process group and
# takes it back at the end (a later run in this process starts clean).
@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (1, "bf16"), (2, "fp32")])
def test_deepspeed_one_process_skips_nonfinite_loss_and_gradient(tmp_path, zero_stage, precision):
    config = _config(tmp_path, backend="deepspeed", precision=precision)
    config = replace(config, deepspeed=replace(config.deepspeed, zero_stage=zero_stage))
    run_poisoned(config, POISON_ONE_RANK)
    _check_skips(tmp_path / "pretrain_stage0")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed", "ddp"])
def test_two_processes_agree_to_skip(tmp_path, backend):
    """ZeRO-3 (parameters are empty shards outside forward/backward) and DDP, with each bad value on one rank only."""
    config = _config(tmp_path, backend=backend)
    config = replace(config, deepspeed=replace(config.deepspeed, zero_stage=3))
    _run_script(tmp_path, config, POISON, processes=2)
    _check_skips(tmp_path / "pretrain_stage0")


def test_repeated_nonfinite_steps_stop_the_run_and_keep_the_last_checkpoint(tmp_path):
    config = _config(tmp_path, backend="single", max_steps=20, save_every_steps=2)
    # micro-batches 1-9 fine (steps 1-4 complete), then NaN forever: steps 5-9 skipped, the fifth stops the run
    with pytest.raises(NonFiniteLossError, match="5 optimizer steps in a row skipped.*intact: .*step_00000008"):
        run_poisoned(config, lambda key: "loss" if key[1] > 9 else None)
    ckpt = tmp_path / "pretrain_stage0" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000008"
    # steps 5-8 were skipped: the last checkpoint holds exactly the weights and optimizer state of step 4
    last, good = _training_state(ckpt / "step_00000008"), _training_state(ckpt / "step_00000004")
    assert all(torch.equal(last[k], good[k]) for k in good if "/model/" in k or "/optimizer/state/" in k)
    assert all(torch.isfinite(v).all() for k, v in last.items() if "/model/" in k)
    assert not (tmp_path / "pretrain_stage0" / FINAL_WEIGHTS).exists()
