"""The training engine end to end on CPU, tiny preset: stages, hand-off, metrics, resume, DeepSpeed (the non-finite guard:
test_nonfinite.py)."""
import json
import shutil
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import utils
from model import CortexModel, save_weights
from trainer.checkpoint import FINAL_WEIGHTS, resolve_init_weights
from trainer.cli import build_task
from trainer.errors import InputError
from trainer.loop import micro_batch_plan, run_stage
from trainer.metrics import read_metrics
from trainer.plot import plot_run
from trainer.schedule import WarmupCosineSchedule

REPO = Path(__file__).resolve().parents[1]


def tiny(stage: str, run_root: Path, **changes):
    config = utils.stage_config(stage, preset="tiny")
    return replace(config, run_root=str(run_root), **changes)


def train(config):
    return run_stage(config, lambda c: build_task(c, utils.data_files(c)))


def script_env(run_root: Path) -> dict:
    return {**os.environ, "CORTEX_PRESET": "tiny", "CORTEX_RUN_DIR": str(run_root), "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------------------------------
# pieces

def test_schedule_warmup_cosine_min():
    s = WarmupCosineSchedule.from_ratio(1e-4, 1e-3, 1e-5, total_steps=100, warmup_ratio=0.1)
    assert s.warmup_steps == 10
    assert s.lr_at(0) == pytest.approx(1e-4)
    assert s.lr_at(5) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert s.lr_at(10) == pytest.approx(1e-3)             # warmup ends at the peak
    assert s.lr_at(99) == pytest.approx(1e-5)             # the last step reaches min_lr
    assert s.lr_at(500) == pytest.approx(1e-5)            # and stays there
    mid = s.lr_at(10 + 89 // 2)
    assert 1e-5 < mid < 1e-3
    lrs = [s.lr_at(i) for i in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))      # monotone decay
    with pytest.raises(ValueError, match="at least one optimizer step"):
        WarmupCosineSchedule.from_ratio(1e-4, 1e-3, 1e-5, total_steps=0, warmup_ratio=0.1)


def test_micro_batch_plan_shards_evenly_and_deterministically():
    config = replace(utils.stage_config("cot", preset="tiny"), micro_batch_size=2, grad_accum_steps=3)
    plans = [micro_batch_plan(101, config, world_size=2, rank=r, epoch=1, file_index=0, shuffle=True) for r in (0, 1)]
    assert plans[0].shape == plans[1].shape == (24, 2)     # 50 per rank -> 48: a multiple of micro x accumulation
    seen = set(plans[0].ravel()) | set(plans[1].ravel())
    assert len(seen) == 96 and not set(plans[0].ravel()) & set(plans[1].ravel())
    again = micro_batch_plan(101, config, world_size=2, rank=0, epoch=1, file_index=0, shuffle=True)
    assert (again == plans[0]).all()
    other_epoch = micro_batch_plan(101, config, world_size=2, rank=0, epoch=2, file_index=0, shuffle=True)
    assert not (other_epoch == plans[0]).all()


def test_weight_decay_spares_norms_and_embeddings():
    from trainer.backend import param_groups

    model = CortexModel(utils.stage_config("cot", preset="tiny").model)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "embed_tokens.weight" in no_decay_names and "head_norm.weight" in no_decay_names
    assert all("norm" in n or n == "embed_tokens.weight" for n in no_decay_names)
    assert "lm_head.weight" in {names[id(p)] for p in decay["params"]}


# ---------------------------------------------------------------------------------------------------------------------
# stages

def test_pretrain_learns_and_hands_off_to_the_next_stage(tmp_path):
    out = train(tiny("pretrain_stage0", tmp_path, max_steps=60, eval_every_steps=30, save_every_steps=20))
    evals = read_metrics(out / "metrics.jsonl", "eval")
    steps = read_metrics(out / "metrics.jsonl", "train")
    assert [e["step"] for e in evals] == [0, 30, 60]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1.5, evals   # held-out loss clearly below step 0
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.5
    for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "router_entropy", "expert_load_max"):
        assert all(isinstance(s[key], float) for s in steps), key
    moe_layers = [k for k in steps[0] if k.startswith("router/") and k.endswith("/load")]
    assert moe_layers == ["router/1/load", "router/2/load"]          # the tiny model: dense layer 0, MoE layers 1-2
    for s in steps:
        shares = s["router/1/load"]
        assert len(shares) == 4 and sum(shares) == pytest.approx(1.0, abs=1e-3)
        assert 0 < s["router/1/entropy"] <= float(torch.log(torch.tensor(4.0))) + 1e-6
    assert len(steps) == 60 and steps[-1]["step"] == 60
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 2 * len(utils.TINY_PRETRAIN_PROMPTS) and all(g["completion"] for g in gens)
    assert (out / FINAL_WEIGHTS).exists() and json.loads((out / "stage.json").read_text())["steps"] == 60
    # the completed stage keeps its weights and only its last checkpoint (step 40's is gone)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000060"]

    # the next stage starts from these weights automatically (strict load), and its first loss shows it
    nxt = train(tiny("pretrain_stage1", tmp_path, max_steps=2, eval_every_steps=0))
    first = read_metrics(nxt / "metrics.jsonl", "train")[0]
    assert first["lm_loss"] < evals[0]["eval_loss"] - 1.0
    assert json.loads((nxt / "stage.json").read_text())["init_from"].endswith("pretrain_stage0/model.safetensors")

    # a completed stage is not retrained by running the same command again
    before = (out / FINAL_WEIGHTS).read_bytes()
    train(tiny("pretrain_stage0", tmp_path, max_steps=60))
    assert (out / FINAL_WEIGHTS).read_bytes() == before

    pngs = plot_run(out)
    assert {p.name for p in pngs} >= {"loss.png", "lr.png"} and all(p.stat().st_size > 1000 for p in pngs)


def test_sft_stages_run_end_to_end(tmp_path):
    # cot starts from a plain torch state dict, the format of the published Cortex checkpoints (dpo.bin, ...)
    model = CortexModel(utils.stage_config("cot", preset="tiny").model)
    torch.save(model.state_dict(), tmp_path / "published.bin")
    save_weights(model, tmp_path / "init.safetensors")
    for stage, init, samples in (("cot", "published.bin", True), ("mix", "init.safetensors", False)):
        out = train(tiny(stage, tmp_path, max_steps=4, eval_every_steps=2, init_from=str(tmp_path / init),
                         samples=samples))
        steps = read_metrics(out / "metrics.jsonl", "train")
        assert len(steps) == 4 and all(0 < s["trained_token_share"] < 1 for s in steps)
        assert (out / FINAL_WEIGHTS).exists()
        assert (out / "generations.jsonl").exists() == samples  # --no-samples: evals without sample generations


def test_cli_flags_for_samples_and_checkpoints():
    from trainer.cli import parse_overrides

    config = utils.stage_config("cot", preset="tiny")
    assert config.samples and not config.keep_checkpoints_after_stage
    changed, _ = parse_overrides(config, ["--no-samples", "--keep-checkpoints", "--max-eval-batches", "1"])
    assert not changed.samples and changed.keep_checkpoints_after_stage and changed.data.max_eval_batches == 1


def test_missing_previous_stage_and_bad_init_weights_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="Run train_pretrain_stage0.py first"):
        resolve_init_weights("auto", "pretrain_stage1", tmp_path)
    bad = tmp_path / "wrong.safetensors"
    save_weights({"embed_tokens.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(Exception, match="embed_tokens.weight"):
        train(tiny("cot", tmp_path, init_from=str(bad), max_steps=1))


# ---------------------------------------------------------------------------------------------------------------------
# resume: kill at any moment, restart the same command, get bit-identical weights

def _run_script(run_root: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train_pretrain_stage0.py", *args], cwd=REPO, env=script_env(run_root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_kill_and_resume_is_bit_identical(tmp_path):
    args = ["--max-steps", "60", "--save-every-steps", "4", "--eval-every-steps", "0"]
    straight = _run_script(tmp_path / "a", args)
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()[-3000:]

    killed = _run_script(tmp_path / "b", args)
    ckpt = tmp_path / "b" / "pretrain_stage0" / "checkpoints" / "step_00000008"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    time.sleep(0.1)  # somewhere after step 8: mid-step, mid-save, whatever comes
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "b" / "pretrain_stage0" / FINAL_WEIGHTS).exists(), "killed too late to test resume"

    resumed = _run_script(tmp_path / "b", args)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-3000:]
    a = load_file(tmp_path / "a" / "pretrain_stage0" / FINAL_WEIGHTS)
    b = load_file(tmp_path / "b" / "pretrain_stage0" / FINAL_WEIGHTS)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every step was trained exactly once: the resumed log has each step, the same losses as the straight run
    la = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a" / "pretrain_stage0" / "metrics.jsonl")}
    lb = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "b" / "pretrain_stage0" / "metrics.jsonl")}
    assert la == lb and sorted(la) == list(range(1, 61))


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO on 2 processes (gloo) follows the same loss curve as one process

def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory) -> list[float]:
    """The reference curve: one process (this one), micro-batch 8 x 2 accumulation steps; the settings of
    TWO_PROC_COMMON."""
    root = tmp_path_factory.mktemp("single")
    return _losses(train(tiny("pretrain_stage0", root, max_steps=6, eval_every_steps=3, save_every_steps=3,
                              grad_accum_steps=2, micro_batch_size=8, backend="single")))


TWO_PROC_COMMON = ["--max-steps", "6", "--eval-every-steps", "3", "--save-every-steps", "3", "--grad-accum-steps", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("backend,zero_stage", [("deepspeed", 2), ("deepspeed", 3), ("ddp", None)])
def test_two_processes_match_one_process(tmp_path, one_process_losses, backend, zero_stage):
    """Same global batch (2 ranks x micro-batch 4 x 2 accumulation steps), same data, same loss curve."""
    extra = ["--zero-stage", str(zero_stage)] if zero_stage is not None else []
    ds = subprocess.run([sys.executable, "-m", "trainer.launch", "train_pretrain_stage0.py", "--num_gpus", "2", "--",
                         *TWO_PROC_COMMON, "--micro-batch-size", "4", "--backend", backend, *extra],
                        cwd=REPO, env=script_env(tmp_path / "ds"), capture_output=True, text=True, timeout=600)
    assert ds.returncode == 0, (ds.stdout[-3000:], ds.stderr[-6000:])
    one, two = one_process_losses, _losses(tmp_path / "ds" / "pretrain_stage0")
    assert len(one) == len(two) == 6
    assert one[-1] < one[0]
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=2e-3, abs=2e-3), (one, two)
    state = json.loads((tmp_path / "ds" / "pretrain_stage0" / "stage.json").read_text())
    assert state["backend"] == backend and state["world_size"] == 2
    # the consolidated weights load strictly into a fresh model
    model = CortexModel(utils.stage_config("pretrain_stage0", preset="tiny").model)
    model.load_state_dict(load_file(tmp_path / "ds" / "pretrain_stage0" / FINAL_WEIGHTS), strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,precision,offload", [(0, "fp32", False), (1, "bf16", False), (3, "bf16", True)])
def test_deepspeed_one_process_variants_train_resume_and_consolidate(tmp_path, zero_stage, precision, offload):
    """ZeRO 0/1/3, fp32/bf16, CPU offload of optimizer and parameters: trains, writes fp32 weights, resumes exactly.
    In this process, as `python3 train_x.py --backend deepspeed` runs: the backend sets up and takes back its
    one-process group, so the resumed run (and later tests) start clean."""
    config = tiny("pretrain_stage0", tmp_path, max_steps=4, eval_every_steps=2, save_every_steps=2,
                  backend="deepspeed", precision=precision, keep_checkpoints_after_stage=True)  # step 2's is rolled back to
    config = replace(config, deepspeed=replace(config.deepspeed, zero_stage=zero_stage, offload_optimizer=offload,
                                               offload_param=offload))
    assert "WORLD_SIZE" not in os.environ
    train(config)
    out = tmp_path / "pretrain_stage0"
    first = _losses(out)
    assert len(first) == 4 and all(l == l for l in first)
    weights = load_file(out / FINAL_WEIGHTS)
    assert all(w.dtype == torch.float32 for w in weights.values())
    CortexModel(config.model).load_state_dict(weights, strict=True)

    # Roll the run back to its step-2 checkpoint (as if it had died after it): it resumes and retraces steps 3-4.
    for name in (FINAL_WEIGHTS, "stage.json", "model_config.json"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    (out / "checkpoints" / "latest").write_text("step_00000002")
    train(config)
    assert "WORLD_SIZE" not in os.environ  # taken back: a later run in this process is not a distributed one
    assert _losses(out) == pytest.approx(first, rel=1e-6)
    assert "resuming at step 2" in (out / "log.txt").read_text()
    resumed = load_file(out / FINAL_WEIGHTS)
    assert all(torch.allclose(weights[k], resumed[k], atol=1e-6) for k in weights)
