"""The output head: logits, or each position's log-probability of a given target token without the logits.

Training (cross entropy, GRPO and DPO log-probs) needs only the targets' log-probs. With Cortex's 46957-token vocabulary
the (batch, seq, vocab) logits are a step's largest tensors (8 x 2048 positions: 3 GB in fp32, as much again for their
gradient), so `target_log_probs` projects a chunk of positions at a time, in forward and again in backward (the fused
linear + cross-entropy idea). Figures in bench/bench_head.py and the README.
"""

import torch
from torch import nn

IGNORE_INDEX = -100  # a target that is not scored: log-prob 0, no gradient
CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB in fp32, 357 positions of Cortex's vocabulary


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's products compute in: autocast's when it is on (as nn.Linear's would), else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def _chunks(num_rows: int, vocab_size: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // vocab_size)
    return [slice(start, start + step) for start in range(0, num_rows, step)]


class _TargetLogProbs(torch.autograd.Function):
    """hidden (N, H) and weight (V, H) of one dtype, targets (N,) -> log-probs (N,) and entropies (N,) in fp32.

    A chunk's logits are computed in the inputs' dtype and scored in fp32; backward computes them again."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, with_entropy):
        log_probs = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(log_probs) if with_entropy else log_probs.new_empty(0)
        for rows in _chunks(len(hidden), len(weight)):
            logits = (hidden[rows] @ weight.t()).float()
            log_sum_exp = logits.logsumexp(dim=-1)
            log_probs[rows] = logits.gather(1, targets[rows, None].clamp(min=0)).squeeze(1) - log_sum_exp
            if with_entropy:
                logits -= log_sum_exp[:, None]  # now log p
                entropy[rows] = -(logits.exp() * logits).sum(dim=-1)
        log_probs.masked_fill_(targets == IGNORE_INDEX, 0.0)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_entropy):
        hidden, weight, targets = ctx.saved_tensors
        grad_rows = grad_log_probs.masked_fill(targets == IGNORE_INDEX, 0.0)[:, None]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for rows in _chunks(len(hidden), len(weight)):
            logits = (hidden[rows] @ weight.t()).float()
            # d log p_t / d logits = onehot(t) - softmax(logits), times the upstream gradient
            grad_logits = logits.softmax(dim=-1).mul_(-grad_rows[rows])
            grad_logits.scatter_add_(1, targets[rows, None].clamp(min=0), grad_rows[rows])
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[rows] = grad_logits @ weight
            if grad_logits.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), hidden[rows])
            else:  # bf16/fp16 products, summed over the chunks in fp32
                grad_weight += grad_logits.t() @ hidden[rows]
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def target_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(hidden @ weight.T)[target] per position, a chunk of positions at a time.

    hidden (..., H), weight (V, H), targets (...) with IGNORE_INDEX where not scored. Returns (log-probs (...) fp32, 0
    where ignored; with_entropy: each position's entropy (...) fp32 without gradient, else None)."""
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected {tuple(hidden.shape[:-1])} (one per position)")
    dtype = compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):  # cast here, as nn.Linear would under autocast
        log_probs, entropy = _TargetLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]).to(dtype), weight.to(dtype),
                                                   targets.reshape(-1), with_entropy)
    return log_probs.view(targets.shape), entropy.view(targets.shape) if with_entropy else None


class LMHead(nn.Linear):
    """The vocabulary projection (`lm_head.weight`, no bias): head(x) gives logits, head(x, targets) target log-probs.
    Both run in this module's forward, around which DeepSpeed ZeRO-3 gathers the weight."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, with_entropy: bool = False):
        if targets is None:
            return super().forward(x)
        return target_log_probs(x, self.weight, targets, with_entropy)
