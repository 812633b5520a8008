"""Next-token choice for a batch in which every row has its own temperature and top-p.

Same distribution as model.process_logits + select_tokens (temperature 0 = argmax; top-p keeps a token while the tokens
more likely than it hold at most top_p; top_p 0 or 1 = no cut), computed for all rows at once and cheaply on CPU:
* the nucleus comes from the 64 most likely tokens whenever they hold more than top_p (then no other token can be in
  it), so the full-vocabulary sort is only needed for flat distributions;
* the draw is one uniform number per row through the cumulative distribution, not torch.multinomial (on CPU ~10x
  slower, and it grows with the vocabulary: 12 ms for 8 rows of the 46957-token vocabulary against 2 ms);
* the caller gives each row its uniform number, and rows with and without a nucleus cut are drawn apart, so a row's
  token depends only on its own logits, settings and number, never on the other rows of the batch (seeded requests).
"""

import torch

NUCLEUS_CANDIDATES = 64


def _candidates(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor):
    """(weights (B, C), token ids (B, C) or None when C is the whole vocabulary in order): each row's probabilities,
    zero outside its nucleus (not renormalised)."""
    probs = (logits.float() / temperature[:, None]).softmax(dim=-1)
    cut = (top_p > 0) & (top_p < 1)
    if not bool(cut.any()):
        return probs, None
    keep_mass = torch.where(cut, top_p, 2.0)[:, None]  # 2 exceeds any mass: rows without a cut keep every token
    top_probs, top_idx = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)  # descending
    if bool(((top_probs.sum(dim=-1) > top_p) | ~cut).all()):
        weights, ids = top_probs, top_idx
    else:
        weights, ids = probs.sort(dim=-1, descending=True)
    weights = weights.masked_fill(weights.cumsum(dim=-1) - weights > keep_mass, 0.0)  # model.process_logits' rule
    if ids.shape[-1] == probs.shape[-1] or bool(cut.all()):
        return weights, ids
    # some rows without a cut: back to vocabulary order, their full distribution
    return torch.where(cut[:, None], torch.zeros_like(probs).scatter_(-1, ids, weights), probs), None


def next_token_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits (B, V), temperature (B,) > 0, top_p (B,) -> fp32 probabilities (B, V), zero outside each row's nucleus."""
    weights, ids = _candidates(logits, temperature, top_p)
    if ids is not None:
        weights = weights.new_zeros(logits.shape).scatter_(-1, ids, weights)
    return weights / weights.sum(dim=-1, keepdim=True)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  uniform: torch.Tensor) -> torch.Tensor:
    """logits (B, V), uniform (B,) in [0, 1) -> token ids (B,): argmax for rows with temperature 0, else a draw from
    next_token_probs."""
    tokens = logits.argmax(dim=-1)
    sampled = temperature > 0
    cut = (top_p > 0) & (top_p < 1)
    for group in (sampled & cut, sampled & ~cut):
        if not bool(group.any()):
            continue
        rows = slice(None) if bool(group.all()) else group.nonzero(as_tuple=True)[0]
        weights, ids = _candidates(logits[rows], temperature[rows], top_p[rows])
        cdf = weights.cumsum(dim=-1)
        total = cdf[:, -1:]
        target = uniform[rows][:, None].to(cdf.dtype) * total
        target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))  # u * total may round up
        # the first position whose cumulative weight exceeds the target: always a token of non-zero probability
        drawn = torch.searchsorted(cdf, target, right=True)
        tokens[rows] = (drawn if ids is None else ids.gather(-1, drawn)).squeeze(-1)
    return tokens
