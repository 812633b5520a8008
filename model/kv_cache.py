"""Key/value cache for incremental decoding: per layer, post-norm post-RoPE keys and values of shape (B, n_kv, S, D)."""

import torch


class KVCache:
    """`KVCache()` grows by concatenation (the reference's behaviour); `KVCache(max_length=N)` allocates N positions per
    layer on first use and writes in place. Rows share the sequence axis (left-padded, masked by the caller);
    keys[i] / values[i] hold layer i's storage, its first get_seq_len(i) positions valid."""

    def __init__(self, max_length: int | None = None):
        if max_length is not None and max_length < 1:
            raise ValueError(f"KVCache max_length must be positive, got {max_length}")
        self.max_length = max_length
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []

    def get_seq_len(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx] if layer_idx < len(self.lengths) else 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value (B, n_kv, T, D) for one layer; return all keys/values of that layer so far."""
        if layer_idx > len(self.keys):
            raise RuntimeError(f"KVCache: layer {layer_idx} updated before layer {len(self.keys)}")
        if layer_idx == len(self.keys):
            if self.max_length is None:
                self.keys.append(key)
                self.values.append(value)
                self.lengths.append(key.shape[-2])
                return key, value
            batch, heads, _, head_dim = key.shape
            # zeros, not empty: a compiled decode step reads the whole buffer (masked), and 0 x NaN garbage is NaN
            self.keys.append(key.new_zeros(batch, heads, self.max_length, head_dim))
            self.values.append(value.new_zeros(batch, heads, self.max_length, head_dim))
            self.lengths.append(0)

        start = self.lengths[layer_idx]
        end = start + key.shape[-2]
        if self.max_length is None:
            self.keys[layer_idx] = torch.cat((self.keys[layer_idx], key), dim=-2)
            self.values[layer_idx] = torch.cat((self.values[layer_idx], value), dim=-2)
        else:
            if end > self.max_length:
                raise RuntimeError(f"KVCache is full: it holds {start} of max_length={self.max_length} positions and "
                                   f"{key.shape[-2]} more were added; create it with a larger max_length (prompt "
                                   "length + max new tokens)")
            if key.shape[0] != self.keys[layer_idx].shape[0]:
                raise RuntimeError(f"KVCache was allocated for batch size {self.keys[layer_idx].shape[0]}, "
                                   f"got {key.shape[0]}")
            self.keys[layer_idx][:, :, start:end] = key
            self.values[layer_idx][:, :, start:end] = value
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]
