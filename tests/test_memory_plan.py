"""The memory plan (trainer/memory_plan.py, `train_x.py --plan`) against saved tensors and measured peak memory, and the
recipe's global batch rule (trainer.config.fit_global_batch)."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import utils
from bench.bench_memory_plan import SMALL, measure_peak
from model import CortexModel
from trainer.config import fit_global_batch, global_batch
from trainer.memory_plan import estimate, layer_activation_bytes

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_activation_bytes_match_what_autograd_saves(dtype):
    """Per token, the bytes the formula counts for a MoE and a dense layer against the tensors autograd keeps."""
    model_config = SMALL.model
    model = CortexModel(model_config).to(dtype).train()
    rows, length = 2, 64
    x = torch.randn(rows, length, model_config.hidden_size, dtype=dtype, requires_grad=True)
    cos, sin = model.rotary_emb(torch.arange(length)[None], dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shared = {t.untyped_storage().data_ptr() for t in (cos, sin)}  # computed once for all layers
    for index in (0, 1):  # dense, MoE
        saved = {}

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in params and key not in shared:
                saved[key] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.layers[index](x, cos, sin, None, True, None)
        kv = model_config.num_key_value_heads * model_config.head_dim
        counted = layer_activation_bytes(model_config, index, dtype.itemsize, kv_saved=kv) * rows * length
        assert counted == pytest.approx(sum(saved.values()), rel=0.01), index


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak RSS through Linux's /proc")
def test_plan_matches_measured_peak_memory_and_checkpointing_lowers_it():
    """One-device fp32 training steps of a small MoE on CPU, peak RSS measured in a child process."""
    small = replace(SMALL, data=replace(SMALL.data, max_seq_len=256))
    measured = {}
    for checkpointing in (False, True):
        config = replace(small, activation_checkpointing=checkpointing)
        measured[checkpointing] = measure_peak(config, steps=2)
        plan = estimate(config, 1, device="cpu", backend="single")
        estimated = plan.total_checkpointed if checkpointing else plan.total
        assert estimated == pytest.approx(measured[checkpointing], rel=0.25), (checkpointing, estimated, measured)
    assert measured[True] < 0.9 * measured[False], measured


def test_the_recipe_global_batch_is_kept_through_accumulation_or_the_lr_is_scaled():
    mix = utils.stage_config("mix", preset="full")  # 4 GPUs x 6 x 3 = 72
    assert mix.recipe_global_batch == 72 and fit_global_batch(mix, 4) == (mix, None)
    two, note = fit_global_batch(mix, 2)
    assert two.grad_accum_steps == 6 and two.optim == mix.optim and global_batch(two, 2) == 72
    assert "grad_accum_steps 3 -> 6" in note
    # 5 x 6 does not divide 72: accumulation stays, the lrs scale by 90 / 72
    five, note = fit_global_batch(mix, 5)
    assert five.grad_accum_steps == 3 and five.optim.max_lr == pytest.approx(mix.optim.max_lr * 90 / 72)
    assert five.optim.min_lr == pytest.approx(mix.optim.min_lr * 90 / 72) and "scaled linearly" in note
    # accumulation set by hand is kept: the lr scales instead
    manual, note = fit_global_batch(mix, 2, keep_accumulation=True)
    assert manual.grad_accum_steps == 3 and manual.optim.max_lr == pytest.approx(mix.optim.max_lr / 2)
    # GRPO's accumulation splits one rollout: only the lr can follow the number of prompts
    grpo, note = fit_global_batch(utils.stage_config("grpo", preset="full"), 8)
    assert grpo.grad_accum_steps == 1 and grpo.optim.max_lr == pytest.approx(2 * 5e-6)
    # the tiny preset's recipe is whatever it runs as
    tiny = utils.stage_config("mix", preset="tiny")
    assert tiny.recipe_global_batch is None and fit_global_batch(tiny, 3) == (tiny, None)


def test_plan_prints_the_table_and_json_without_training(tmp_path, capsys):
    from trainer.cli import run

    mix = replace(utils.stage_config("mix", preset="full"), run_root=str(tmp_path / "runs"))
    assert run(mix, [], argv=["--plan", "--world-size", "2"]) is None
    table = capsys.readouterr().out
    assert "stage mix: 2 GPU(s), ZeRO-3, bf16" in table and "grad_accum_steps 3 -> 6" in table
    assert "total, checkpointing" in table
    env = {**os.environ, "CORTEX_RUN_DIR": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    env.pop("CORTEX_PRESET", None)
    done = subprocess.run([sys.executable, "train_mix.py", "--plan", "--json", "--world-size", "4",
                           "--activation-checkpointing"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads(done.stdout)
    assert (plan["world_size"], plan["zero_stage"], plan["global_batch"], plan["recipe_note"]) == (4, 3, 72, None)
    b = plan["bytes"]
    assert plan["total"] == sum(b[k] for k in ("parameters", "gradients", "optimizer_states", "zero_buffers",
                                               "model_copies", "activations", "head"))
    assert b["activations_checkpointed"] < b["activations"] / 5
    # ZeRO-3 splits the model states over the 4 GPUs: per parameter bf16 weight and gradient (2 + 2 bytes), the fp32
    # gradient, master weight and Adam moments (4 + 12)
    states = b["parameters"] + b["gradients"] + b["optimizer_states"]
    assert states == pytest.approx(20 * plan["total_parameters"] / 4, rel=0.01)
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written
