"""Attention masks: padding, causality and packed-document boundaries, turned into what SDPA needs."""

import torch


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype SDPA will compute in: autocast's when it is on, else the activations'."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def build_attention_bias(
    attention_mask: torch.Tensor | None,
    doc_boundary_mask: torch.Tensor | None,
    batch: int,
    new_len: int,
    past_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor | None, bool]:
    """Returns (additive bias or None, is_causal) for SDPA.

    Without padding and without a document mask nothing is materialised: SDPA's is_causal for a fresh sequence, no mask
    at all for a single new token. Otherwise the bias is built like the reference's: a finfo.min term for each reason a
    key is blocked (causal, padding, other document), summed, so doubly blocked entries become -inf and a row that is
    entirely blocked (a left-padding position) still has finite entries and gives no NaN.
    """
    total_len = past_len + new_len
    if attention_mask is not None and attention_mask.shape != (batch, total_len):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, past + new tokens) = "
            f"({batch}, {total_len}); with a KV cache pass the mask of the whole sequence so far"
        )
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
            doc_boundary_mask.shape[1:] != (1, new_len, total_len)
        ):
            raise ValueError(
                f"doc_boundary_mask has shape {tuple(doc_boundary_mask.shape)}, expected ({batch}, 1, {new_len}, {total_len})"
            )
        # bool: True = may attend; float: additive like the reference's (0 = attend, negative = blocked)
        doc_blocked = ~doc_boundary_mask if doc_boundary_mask.dtype == torch.bool else doc_boundary_mask < 0
        blocked_terms.append(doc_blocked)

    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    bias = sum(torch.where(blocked, neg, zero) for blocked in blocked_terms)
    return bias, False  # broadcastable to (B, heads, T, S)
