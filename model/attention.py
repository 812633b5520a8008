"""Grouped-query self-attention with qk-norm and RoPE on torch's scaled_dot_product_attention, and its masks."""

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
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:  # one (head_dim,) weight shared by all heads
            self.q_norm = RMSNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_bias: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None) -> torch.Tensor:
        """x (B, T, H). attn_bias: additive (B or 1, 1, T, S) or None; is_causal: let SDPA apply the causal mask."""
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_qk_norm:  # before RoPE, per head over head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)
        k = apply_rotary(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # Query head h reads KV head h // group; on CUDA enable_gqa excludes the memory-efficient kernel a mask needs
        enable_gqa = self.num_kv_heads != self.num_heads
        if enable_gqa and attn_bias is not None and q.device.type != "cpu":
            group = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            enable_gqa = False
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout, is_causal=is_causal,
                                             enable_gqa=enable_gqa)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim))


def build_attention_bias(attention_mask: torch.Tensor | None, doc_boundary_mask: torch.Tensor | None, batch: int,
                         new_len: int, past_len: int, dtype: torch.dtype,
                         device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """(additive bias or None, is_causal) for SDPA, in dtype. Without padding or a document mask: no bias, SDPA's
    is_causal (the flash kernel on a GPU); else the reference's sum of a finfo.min term per reason a key is blocked."""
    total_len = past_len + new_len
    if attention_mask is not None and attention_mask.shape != (batch, total_len):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, past + new tokens) "
                         f"= ({batch}, {total_len}); with a KV cache pass the mask of the whole sequence so far")
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if not has_padding and doc_boundary_mask is None and (new_len == 1 or past_len == 0):
        return None, new_len > 1

    blocked_terms = []
    if new_len > 1:
        query_pos = torch.arange(past_len, total_len, device=device)[:, None]
        blocked_terms.append(torch.arange(total_len, device=device)[None, :] > query_pos)  # (T, S)
    if has_padding:
        blocked_terms.append(~attention_mask.bool()[:, None, None, :])  # (B, 1, 1, S)
    if doc_boundary_mask is not None:
        if doc_boundary_mask.dim() != 4 or doc_boundary_mask.shape[0] not in (1, batch) or (
                doc_boundary_mask.shape[1:] != (1, new_len, total_len)):
            raise ValueError(f"doc_boundary_mask has shape {tuple(doc_boundary_mask.shape)}, "
                             f"expected ({batch}, 1, {new_len}, {total_len})")
        blocked_terms.append(~doc_boundary_mask if doc_boundary_mask.dtype == torch.bool else doc_boundary_mask < 0)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    return sum(torch.where(blocked, neg, zero) for blocked in blocked_terms), False
