"""Rotary position embeddings: default and YaRN frequencies, half-split rotation (GPT-NeoX / HF layout)."""

import math

import torch
from torch import nn

from .config import ModelConfig


def yarn_factor_and_original_length(config: ModelConfig) -> tuple[float, int]:
    original = config.original_max_position_embeddings  # when given, it implies the factor (RoPEConfig.factor ignored)
    if original:
        return config.max_position_embeddings / original, original
    return config.rope_config.factor, config.max_position_embeddings


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_scaling(config: ModelConfig) -> float:
    """The factor folded into cos and sin (1 for default RoPE; YaRN's attention factor otherwise)."""
    rope = config.rope_config
    if rope.rope_type == "default":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    factor, _ = yarn_factor_and_original_length(config)
    if rope.mscale and rope.mscale_all_dim:
        return _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    return _yarn_mscale(factor)


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in fp32."""
    rope, dim = config.rope_config, config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    pos_freqs = rope.rope_theta**exponents
    if rope.rope_type == "default":
        return 1.0 / pos_freqs

    # YaRN: high-frequency pairs keep their frequency, low-frequency ones are divided by the factor, a ramp in between
    factor, original_length = yarn_factor_and_original_length(config)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original_length / (num_rotations * 2 * math.pi)) / (2 * math.log(rope.rope_theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # the reference's operation order, for bit-equal frequencies
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for given positions. inv_freq is a non-persistent fp32 buffer that stays fp32 under .to(dtype)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.attention_scaling = rope_attention_scaling(config)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) would round inv_freq (0.4%, large angle errors at long positions): recompute it in fp32
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config, device=self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B or 1, T) -> cos, sin (B or 1, 1, T, head_dim), broadcast over heads; fp32, cast to dtype."""
        freqs = position_ids.float()[:, None, :, None] * self.inv_freq  # an elementwise product is immune to autocast
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.attention_scaling).to(dtype), (angles.sin() * self.attention_scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split (GPT-NeoX / HF) RoPE of x (B, heads, T, D): x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
