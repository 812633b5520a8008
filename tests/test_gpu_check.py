"""bench/gpu_check.sh: its CPU smoke mode runs every part through the real code paths, so the GPU check cannot rot
before a GPU runs it; a part over the time budget is reported and stopped, not waited for."""
import json
import math
import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("pretrain_stage0", "pretrain_stage1", "mix", "grpo", "dpo")
BACKENDS = {"single": ("single", None), "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3)}
TRAIN_PARTS = [f"{stage}/{backend}" for backend in BACKENDS for stage in STAGES]


def gpu_check(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, list[dict]]:
    done = subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
    return done, [json.loads(line) for line in done.stdout.splitlines()]  # stdout holds JSON lines only


def test_smoke_runs_every_part_and_reports_speed_loss_and_profile():
    done, records = gpu_check("--smoke", "--profile", "--peak-flops", "1e12")  # a peak, so MFU is computed on CPU
    assert done.returncode == 0, done.stderr[-4000:]
    parts = {r["part"]: r for r in records}
    assert [r["part"] for r in records] == ["env", *TRAIN_PARTS, "profile/pretrain_stage1", "serve/eager",
                                            "serve/compile", "summary"]
    failed = {name: r.get("error") for name, r in parts.items() if not r["ok"]}
    assert not failed, failed
    assert parts["env"]["device"] == "cpu" and parts["env"]["smoke"] is True

    for name in [*TRAIN_PARTS, "profile/pretrain_stage1"]:
        r = parts[name]
        stage, backend = (name.split("/")[1], "single") if name.startswith("profile/") else name.split("/")
        assert (r["stage"], r["backend"], r["zero_stage"]) == (stage, *BACKENDS[backend]), name
        assert r["seq_len"] == (128 if stage == "pretrain_stage0" else 256), name  # the tiny preset's
        assert r["steps"] >= 2 and len(r["loss"]) == r["steps"] and len(r["step_s"]) == r["steps"], name
        assert all(math.isfinite(loss) for loss in r["loss"]), (name, r["loss"])
        assert r["tokens_per_s"] > 0 and all(s > 0 for s in r["step_s"]), name
        assert r["plan_gb"] > 0 and r["activation_checkpointing"] is False, name  # --plan's estimate, for the GPU run
        assert r["mfu"] > 0 and abs(r["mfu"] - r["tokens_per_s"] * r["model_flops_per_token"] / 1e12) <= 1e-4, name
    assert parts["grpo/single"]["rollout_tokens_per_s"] > 0

    top = parts["profile/pretrain_stage1"]["top_ops"]
    assert top and all(op["self_ms"] > 0 and op["calls"] >= 1 for op in top)
    assert 0 < sum(op["share"] for op in top) <= 1.0001
    assert "torch.profiler: one optimizer step" in done.stderr  # the table goes to stderr

    for name in ("serve/eager", "serve/compile"):
        r = parts[name]
        assert r["compile"] is (name == "serve/compile")
        for batch in (1, 8):
            assert 0 < r[f"batch{batch}_tokens"] <= batch * r["max_new_tokens"], name
            assert r[f"batch{batch}_tokens_per_s"] > 0, name
    summary = parts["summary"]
    assert summary["ok"] and summary["parts"] == len(records) - 1
    assert summary["mfu_seq2048"] == {f"pretrain_stage1/{b}": parts[f"pretrain_stage1/{b}"]["mfu"] for b in BACKENDS}
    assert summary["mfu_target_met"] is False  # a CPU against a peak of 1 TFLOP/s


def test_a_part_over_the_total_budget_is_stopped_and_reported():
    start = time.monotonic()
    # 2 s cannot cover a worker's imports and a training part: the part is cut off, and the next is not started.
    done, records = gpu_check("--smoke", "--budget-s", "2", "--parts", "pretrain_stage0/single", "serve/eager")
    assert time.monotonic() - start < 30
    assert done.returncode == 1
    assert [r["part"] for r in records] == ["pretrain_stage0/single", "serve/eager", "summary"]
    assert not records[0]["ok"] and "total budget" in records[0]["error"]
    assert not records[1]["ok"] and records[1]["error"].startswith("not run")
    assert records[2]["failed"] == ["pretrain_stage0/single", "serve/eager"]
