"""Token-by-token decoding, one torch.compile'd graph per step (generate(..., compile=True), the server's --compile):
the model's own modules and weights, no data-dependent control flow; each new shape compiles once (a C++ compiler on CPU).
"""

import functools
from collections.abc import Callable

import torch
from torch import nn

from .head import LMHead
from .kv_cache import KVCache


class _WriteAtPositions:
    """KVCache.update in a compiled step: row b's key/value go to position positions[b]; the whole buffer is read."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor):
        self.keys, self.values, self.positions = keys, values, positions
        self.rows = torch.arange(len(positions), device=positions.device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.rows, :, self.positions] = key[:, :, 0]
        values[self.rows, :, self.positions] = value[:, :, 0]
        return keys, values


def decode_step(model: nn.Module, head_t: torch.Tensor | None, tokens: torch.Tensor, position_ids: torch.Tensor,
                write_positions: torch.Tensor, attn_bias: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> torch.Tensor:
    """tokens (B,) at RoPE positions (B, 1), written at cache positions write_positions (B,) -> logits (B, V). head_t:
    the head's (H, V) copy or None; attn_bias (B, 1, 1, S): 0 where a row may attend; keys / values: layer caches."""
    x = model.embed_tokens(tokens[:, None])
    cos, sin = model.rotary_emb(position_ids, x.dtype)
    cache = _WriteAtPositions(keys, values, write_positions)
    for layer in model.layers:
        x, _ = layer(x, cos, sin, attn_bias, False, cache, gather_experts=True)
    x = model.head_norm(x)
    return (model.lm_head(x) if head_t is None else x @ head_t)[:, -1]


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """allowed (B, S) bool, True where a row may attend -> decode_step's additive bias (B, 1, 1, S)."""
    bias = torch.zeros(allowed.shape[0], 1, 1, allowed.shape[1], dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed[:, None, None, :], torch.finfo(dtype).min)


@functools.cache
def _compiled() -> Callable:
    # One function for every model: its weights are graph inputs; the C++ wrapper saves Python per kernel call
    return torch.compile(decode_step, fullgraph=True, options={"cpp_wrapper": True})


def compiled_decode_step(model: nn.Module) -> Callable:
    """decode_step compiled, bound to this model (called like decode_step without model and head_t). The head's copy
    is taken here: bind again after changing the weights (generate does, on each call)."""
    if any(hasattr(param, "ds_id") for param in model.parameters()):  # (an int8 head has no .weight)
        raise ValueError("compiled decoding needs the model's full weights, not DeepSpeed ZeRO-3 shards: generate "
                         "with a plain copy of the model (as the trainer does) or without compile")
    head = model.lm_head  # on CPU an (H, V) copy of it: MKL's one-row product reads that 1.5-2.5x faster than (V, H)
    head_t = head.weight.t().contiguous() if isinstance(head, LMHead) and head.weight.device.type == "cpu" else None
    return functools.partial(_compiled(), model, head_t)


class CompiledDecoder:
    """Decodes into a fixed-size KVCache that holds the prompt, one compiled step per token."""

    def __init__(self, model: nn.Module, cache: KVCache, attention_mask: torch.Tensor | None):
        """attention_mask (B, P) of the prompt in the cache (None = no padding)."""
        self.step_fn = compiled_decode_step(model)
        if cache.max_length is None or not cache.keys:
            raise ValueError("CompiledDecoder needs a fixed-size KVCache (KVCache(max_length=...)) holding the prompt")
        self.cache = cache
        batch, _, max_length, _ = cache.keys[0].shape
        allowed = torch.zeros(batch, max_length, dtype=torch.bool, device=cache.keys[0].device)
        allowed[:, :cache.get_seq_len()] = True if attention_mask is None else attention_mask.bool()
        self.attn_bias = attention_bias(allowed, cache.keys[0].dtype)

    def step(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """tokens (B,) at RoPE positions (B, 1) -> next-token logits (B, V); the cache grows by one position."""
        cache, position = self.cache, self.cache.get_seq_len()
        if position >= cache.max_length:
            raise RuntimeError(f"KVCache is full: it holds max_length={cache.max_length} positions")
        self.attn_bias[..., position] = 0
        write_positions = torch.full((len(tokens),), position, device=tokens.device)
        logits = self.step_fn(tokens, position_ids, write_positions, self.attn_bias, cache.keys, cache.values)
        cache.lengths = [position + 1] * len(cache.lengths)
        return logits
