"""Peak memory of real training steps on CPU, measured, against trainer/memory_plan.py's estimate.

    OMP_NUM_THREADS=1 python3 bench/bench_memory_plan.py     # one JSON line per case

Each case runs in a child process: after the imports and a warm-up step of a toy model (torch's own memory and what it
loads on first use are the baseline, not counted) the peak RSS is reset (/proc/self/clear_refs), then the model is
built and trains a few optimizer steps of the pretraining loss on one device in fp32 (packed documents with their
mask, as the pretrain task feeds them); the peak RSS minus the baseline is compared with the plan's total for the same
config on device 'cpu'. Linux only.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import cortex_2_5_config  # noqa: E402
from trainer.config import DataConfig, OptimConfig, TrainConfig  # noqa: E402
from trainer.memory_plan import estimate  # noqa: E402

# A small Cortex-shaped MoE whose step dominates the process: 2048 tokens per micro-batch.
SMALL_MODEL = replace(cortex_2_5_config(), vocab_size=8000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0,
                      moe_config=replace(cortex_2_5_config().moe_config, intermediate_size=256))
SMALL = TrainConfig(stage="pretrain_stage0", task="pretrain", model=SMALL_MODEL, data=DataConfig(max_seq_len=512),
                    optim=OptimConfig(initial_lr=1e-3, max_lr=1e-3, min_lr=1e-4), micro_batch_size=4,
                    grad_accum_steps=1, backend="single", precision="fp32")

CHILD = r"""
import json, pickle, sys
from dataclasses import replace
import torch
from model import CortexModel, tiny_config
from trainer.activation_checkpointing import enable_activation_checkpointing
from trainer.backend import build_backend
from trainer.data import packed_positions_and_mask
from trainer.tasks import next_token_targets

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

config = pickle.loads(bytes.fromhex(sys.argv[1]))
steps = int(sys.argv[2])
generator = torch.Generator().manual_seed(0)
batches = []
for _ in range(steps):
    shape = (config.micro_batch_size, config.data.max_seq_len)
    ids = torch.randint(3, config.model.vocab_size, shape, generator=generator)
    ids[:, 100::200] = 2  # documents end with </s> (id 2) every 200 tokens
    position_ids, doc_mask = packed_positions_and_mask(ids, eos_id=2)
    batches.append(dict(input_ids=ids, position_ids=position_ids, doc_boundary_mask=doc_mask))
def train(config, batches):
    torch.manual_seed(0)
    model = CortexModel(config.model)
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    backend = build_backend(config, model)
    for batch in batches:
        targets = next_token_targets(batch["input_ids"])
        out = backend.forward(**batch, targets=targets, sum_target_log_probs=True)
        loss = -out["target_log_probs"] / targets.numel() + config.aux_loss_coef * out["aux_loss"]
        backend.backward(loss)
        backend.step(config.optim.max_lr)

# Warm up on a toy model first: what the first step loads lazily (modules torch imports on first use, kernels) is part
# of the process's baseline, not of the step.
train(replace(config, model=tiny_config(64)), [{"input_ids": torch.randint(0, 64, (2, 16))}])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS to the current RSS
baseline = rss("VmRSS")
train(config, batches)
print(json.dumps({"peak_bytes": rss("VmHWM") - baseline, "baseline_bytes": baseline}))
"""


def measure_peak(config: TrainConfig, steps: int = 3) -> int:
    """Peak RSS of `steps` training steps of config in a child process, minus the RSS after its imports (bytes)."""
    # Allocations over 64 KB get their own pages, returned to the OS when freed: RSS then follows the live tensors (as
    # CUDA's allocated bytes do) instead of keeping glibc's freed heap.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", CHILD, pickle.dumps(config).hex(), str(steps)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the measuring child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def compare(config: TrainConfig) -> dict:
    measured = measure_peak(config)
    plan = estimate(config, 1, device="cpu", backend="single")
    estimated = plan.total_checkpointed if config.activation_checkpointing else plan.total
    return {"activation_checkpointing": config.activation_checkpointing, "tokens_per_micro_batch":
            config.micro_batch_size * config.data.max_seq_len, "parameters": plan.total_parameters,
            "measured_peak_mb": round(measured / 1e6, 1), "estimated_mb": round(estimated / 1e6, 1),
            "estimate_over_measured": round(estimated / measured, 3)}


if __name__ == "__main__":
    for checkpointing in (False, True):
        print(json.dumps(compare(replace(SMALL, activation_checkpointing=checkpointing))), flush=True)
