"""Training-step throughput and MFU of the engine, on synthetic packed pretraining batches.

    python3 bench/bench_train.py                       # tiny preset (CPU fine), and the full config when a GPU is present
    python3 bench/bench_train.py --configs full --steps 20 --micro-batch-size 8

One JSON line per config: tokens/s of a full optimizer step (forward, backward, clip, AdamW) through the engine's
single-device backend, the model FLOPs per token, and MFU where the device's peak FLOP/s is known (--peak-flops sets it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402
from model import CortexModel, count_parameters  # noqa: E402
from trainer.backend import build_backend  # noqa: E402
from trainer.data import packed_positions_and_mask  # noqa: E402
from trainer.metrics import device_peak_flops, train_flops_per_token  # noqa: E402
from trainer.tasks import lm_loss  # noqa: E402


def bench(preset: str, steps: int, warmup: int, micro_batch_size: int | None, precision: str, peak_flops: float | None):
    config = utils.stage_config("pretrain_stage0", preset=preset)
    config = replace(config, backend="single", precision=precision, grad_accum_steps=1,
                     micro_batch_size=micro_batch_size or config.micro_batch_size)
    torch.manual_seed(0)
    backend = build_backend(config, CortexModel(config.model))
    seq_len, batch = config.data.max_seq_len, config.micro_batch_size
    eos = 2
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, config.model.vocab_size, (batch, seq_len), generator=gen)
    input_ids[:, ::97] = eos  # a few documents per window, as in packed pretraining
    position_ids, doc_mask = packed_positions_and_mask(input_ids, eos)
    inputs = {k: v.to(backend.device) for k, v in
              {"input_ids": input_ids, "position_ids": position_ids, "doc_boundary_mask": doc_mask}.items()}

    def step():
        lm, out = lm_loss(backend.forward, inputs, inputs["input_ids"])
        loss = lm + config.aux_loss_coef * out["aux_loss"]
        backend.backward(loss)
        backend.step(1e-4)
        return loss.detach()

    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if backend.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    sync()
    elapsed = time.perf_counter() - start
    tokens_per_s = steps * batch * seq_len / elapsed
    flops_per_token = train_flops_per_token(config.model, seq_len)
    peak = peak_flops or device_peak_flops(backend.device)
    counts = count_parameters(config.model)
    return {"config": preset, "device": str(backend.device) if backend.device.type != "cuda" else torch.cuda.get_device_name(),
            "precision": backend.precision, "params_total": counts.total, "params_active": counts.active,
            "micro_batch": batch, "seq_len": seq_len, "steps": steps, "step_s": round(elapsed / steps, 4),
            "tokens_per_s": round(tokens_per_s, 1), "model_flops_per_token": flops_per_token,
            "mfu": round(tokens_per_s * flops_per_token / peak, 4) if peak else None,
            "peak_flops": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", choices=["tiny", "full"], default=None,
                        help="default: tiny, plus full when a CUDA GPU is present")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: the stage-0 setting of the preset")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU (default: known GPUs)")
    args = parser.parse_args()
    configs = args.configs or (["tiny", "full"] if torch.cuda.is_available() else ["tiny"])
    for preset in configs:
        print(json.dumps(bench(preset, args.steps, args.warmup, args.micro_batch_size, args.precision, args.peak_flops)),
              flush=True)


if __name__ == "__main__":
    main()
