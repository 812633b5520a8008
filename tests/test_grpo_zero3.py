"""GSPO under DeepSpeed ZeRO-3 on two processes (CPU, gloo), started through smart_train as a user would: it trains on
both ranks, consolidates the weights, and every rank exits cleanly."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import utils
from model import CortexModel
from tests.test_grpo import init_weights  # noqa: F401  (the fixture: tiny GSPO starting weights)
from trainer.checkpoint import FINAL_WEIGHTS
from trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]

# train_grpo.py with two changes: two updates per rollout, and a reward that even an untrained model's completions differ in, so the advantages,
# and with them the policy loss, the importance ratios and their clipping, are not all zero.
STAGE_SCRIPT = """\
import sys
sys.path.insert(0, {repo!r})
from dataclasses import replace
import utils
from trainer.cli import run

config = utils.stage_config("grpo")
config = replace(config, grpo=replace(config.grpo, reward="tests.test_grpo_zero3:distinct_character_share",
                                      grpo_steps=2))  # two updates per rollout (the tiny preset does one)
run(config, utils.data_files(config))
"""


def distinct_character_share(samples):
    """The share of distinct characters in each completion."""
    return [len(set(s.completion)) / max(len(s.completion), 1) for s in samples]


@pytest.mark.slow
def test_gspo_zero3_on_two_processes_trains_consolidates_and_exits_cleanly(tmp_path, init_weights):  # noqa: F811
    pytest.importorskip("deepspeed")
    script = tmp_path / "train_grpo_distinct.py"
    script.write_text(STAGE_SCRIPT.format(repo=str(REPO)))
    env = {**os.environ, "CORTEX_PRESET": "tiny", "CORTEX_RUN_DIR": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "trainer.launch", str(script), "--num_gpus", "2", "--",
                           "--backend", "deepspeed", "--zero-stage", "3", "--max-steps", "4", "--eval-every-steps", "2",
                           "--init-from", str(init_weights)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "terminate called" not in output and "stage grpo complete" in output

    out = tmp_path / "runs" / "grpo"
    summary = json.loads((out / "stage.json").read_text())
    assert (summary["backend"], summary["world_size"], summary["steps"]) == ("deepspeed", 2, 4)
    assert summary["train_config"]["deepspeed"]["zero_stage"] == 3

    steps = read_metrics(out / "metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3, 4]     # 2 rollouts x grpo_steps 2
    for key in ("loss", "policy_loss", "aux_loss", "reward_mean", "reward_std", "approx_kl", "clip_low", "clip_high",
                "entropy", "completion_len", "grad_norm"):
        assert all(math.isfinite(s[key]) for s in steps), (key, [s[key] for s in steps])
    for first, second in ((steps[0], steps[1]), (steps[2], steps[3])):
        assert first["reward_mean"] == second["reward_mean"] and first["reward_std"] > 0  # one rollout, varied rewards
        # the first update sees the rollout's own weights on both ranks: ratio exactly 1, and the advantages of each
        # group sum to 0, so the loss does too
        assert first["approx_kl"] == 0 and first["clip_low"] == first["clip_high"] == 0
        assert abs(first["policy_loss"]) < 1e-5
        # the second one sees the updated weights: ratios moved (some beyond the clip range) and the loss went down
        assert second["approx_kl"] > 0 and second["clip_low"] + second["clip_high"] > 0
        assert second["policy_loss"] < first["policy_loss"] - 1e-5
    assert 0 < steps[0]["completion_len"] <= utils.stage_config("grpo", preset="tiny").grpo.max_new_tokens
    evals = read_metrics(out / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [0, 2, 4] and all(math.isfinite(e["eval_reward"]) for e in evals)
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert {g["step"] for g in generations} == {2, 4}    # on the gathered ZeRO-3 weights, mid-run and at the end

    # both ranks wrote their part of the last checkpoint
    last = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    assert {p.name for p in last.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    assert {p.name.split("_mp_rank")[0] for p in (last / "deepspeed").glob("zero_pp_rank_*_optim_states.pt")} == \
        {"zero_pp_rank_0", "zero_pp_rank_1"}

    # the consolidated weights: every shard gathered (strict load), finite, and trained away from the start
    weights = load_file(out / FINAL_WEIGHTS)
    CortexModel(utils.stage_config("grpo", preset="tiny").model).load_state_dict(weights, strict=True)
    start = load_file(init_weights)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(not torch.equal(weights[k], start[k]) for k in start)
