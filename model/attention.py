"""Grouped-query self-attention with qk-norm and RoPE, on torch's scaled_dot_product_attention."""

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .norm import RMSNorm
from .rope import apply_rotary


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        if config.use_qk_norm:
            # one (head_dim,) weight shared by all heads
            self.q_norm = RMSNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim)
        self.use_qk_norm = config.use_qk_norm

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        attn_bias: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """x (B, T, H). attn_bias: additive (B or 1, 1, T, S) or None; is_causal: let SDPA apply the causal mask."""
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_qk_norm:  # before RoPE, per head over head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, signed_sin)
        k = apply_rotary(k.transpose(1, 2), cos, signed_sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # Query head h reads KV head h // group (a contiguous group). enable_gqa does that without materialising repeated
        # K/V, but on CUDA only the flash and math kernels support it and flash takes no mask: with a mask, K/V are
        # repeated there so that the memory-efficient kernel stays eligible instead of the math one. (The CPU kernel
        # takes both.)
        enable_gqa = self.num_kv_heads != self.num_heads
        if enable_gqa and attn_bias is not None and q.device.type != "cpu":
            group = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            enable_gqa = False
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_bias,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=enable_gqa,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim))
