"""Token-by-token decoding as one compiled graph per step: what generate(..., compile=True) runs after the prompt.

Decoding one token eagerly runs some 300 small operations, and their dispatch (on a GPU, their kernel launches) costs
more than their arithmetic. The step below has no data-dependent Python control flow, so torch.compile makes one graph
of it: the KV cache is a fixed-size buffer written at a position held in a tensor and read whole under a mask (no
slicing to the current length), and each row's routed experts are picked by index from the stacked expert weights
(RoutedExperts.gathered) instead of a Python loop over experts. It runs the model's own modules on the model's own
weights (no copy), so it follows weight updates, and its numbers match eager decoding up to rounding order.
torch.compile needs a C++ compiler on CPU and Triton on CUDA; the first step of a new shape compiles (seconds).
"""

import weakref

import torch
from torch import nn

from .kv_cache import KVCache


class _WriteAtPosition:
    """The KVCache interface inside a compiled step: the new key/value go to `position` (a (1,) tensor) of each layer's
    fixed-size buffer, and attention reads the whole buffer; the caller's bias masks what is not written yet."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], position: torch.Tensor):
        self.keys, self.values, self.position = keys, values, position

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.keys[layer_idx].index_copy_(2, self.position, key),
                self.values[layer_idx].index_copy_(2, self.position, value))


def decode_step(model: nn.Module, tokens: torch.Tensor, position_ids: torch.Tensor, write_position: torch.Tensor,
                attn_bias: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """One new token per row through the whole model.

    tokens (B,); position_ids (B, 1) RoPE positions; write_position (1,) the cache slot of this token, advanced by one;
    attn_bias (B, 1, 1, S) additive, 0 where a row may attend (its real tokens so far), finfo.min elsewhere, opened here
    at write_position; keys / values: each layer's (B, n_kv, S, head_dim) buffer. Returns the logits (B, V)."""
    attn_bias.index_fill_(-1, write_position, 0)
    x = model.embed_tokens(tokens[:, None])
    cos, signed_sin = model.rotary_emb(position_ids, x.dtype)
    cache = _WriteAtPosition(keys, values, write_position)
    for layer in model.layers:
        x, _ = layer(x, cos, signed_sin, attn_bias, False, cache, gather_experts=True)
    write_position.add_(1)
    return model.lm_head(model.head_norm(x))[:, -1]


_compiled_steps: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


class CompiledDecoder:
    """Decodes into a fixed-size KVCache already filled with the prompt; one compiled step per token."""

    def __init__(self, model: nn.Module, cache: KVCache, attention_mask: torch.Tensor | None):
        """attention_mask (B, P) of the prompt in the cache (None = no padding)."""
        if hasattr(model.lm_head.weight, "ds_id"):
            raise ValueError("compile=True needs the model's full weights, not DeepSpeed ZeRO-3 shards: generate with "
                             "a plain copy of the model (as the trainer does) or with compile=False")
        if cache.max_length is None or not cache.keys:
            raise ValueError("CompiledDecoder needs a fixed-size KVCache (KVCache(max_length=...)) holding the prompt")
        if model not in _compiled_steps:
            # the model is an argument of the compiled function: its parameters are graph inputs, so weight updates
            # are seen without recompiling (only shapes, dtypes and devices are guarded)
            _compiled_steps[model] = torch.compile(decode_step, fullgraph=True, options={"cpp_wrapper": True})
        self.step_fn = _compiled_steps[model]
        self.model, self.cache = model, cache
        batch, _, max_length, _ = cache.keys[0].shape
        length = cache.get_seq_len()
        dtype, device = cache.keys[0].dtype, cache.keys[0].device
        blocked = torch.ones(batch, max_length, dtype=torch.bool, device=device)
        blocked[:, :length] = False if attention_mask is None else ~attention_mask.bool()
        neg = torch.finfo(dtype).min
        self.attn_bias = torch.zeros(batch, 1, 1, max_length, dtype=dtype, device=device).masked_fill_(
            blocked[:, None, None, :], neg)
        self.write_position = torch.tensor([length], device=device)

    def step(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """tokens (B,) at RoPE positions (B, 1) -> next-token logits (B, V); the cache grows by one position."""
        cache, position = self.cache, self.cache.get_seq_len()
        if position >= cache.max_length:
            raise RuntimeError(f"KVCache is full: it holds max_length={cache.max_length} positions")
        logits = self.step_fn(self.model, tokens, position_ids, self.write_position, self.attn_bias, cache.keys,
                              cache.values)
        cache.lengths = [position + 1] * len(cache.lengths)
        return logits
