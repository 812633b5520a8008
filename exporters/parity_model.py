"""The tiny model that export checks compare runtimes on (tests/test_export*.py, bench/bench_llama_cpp.py)."""

import dataclasses

import torch

from model import CortexModel, tiny_config


def parity_model(vocab_size: int, seed: int = 0, head_scale: float = 1.0) -> CortexModel:
    """Tiny Cortex layout with Cortex's YaRN (2048 positions from 512) and random weights that show export mistakes:
    norms away from 1, so that a swapped or missing norm shows; head_scale > 1 sharpens the head, so that greedy choices
    are not near-ties between runtimes that compute a little differently."""
    torch.manual_seed(seed)
    config = dataclasses.replace(tiny_config(vocab_size, long_context=True), max_position_embeddings=2048,
                                 original_max_position_embeddings=512)
    model = CortexModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
        model.lm_head.weight.mul_(head_scale)
    return model.eval()
