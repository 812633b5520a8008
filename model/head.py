"""The output head: logits, or each position's log-probability of a given target token without the logits.

Training (cross entropy, GRPO and DPO log-probs) needs only the targets' log-probs. With Cortex's 46957-token vocabulary
the (batch, seq, vocab) logits are a step's largest tensors (8 x 2048 positions: 3 GB in fp32, as much again for their
gradient), so `target_log_probs` projects a chunk of positions at a time, in forward and again in backward (the fused
linear + cross-entropy idea). Figures in bench/bench_head.py and the README.
"""

import torch
from torch import nn

IGNORE_INDEX = -100  # a target that is not scored: log-prob 0, no gradient
# Logits per chunk: 256 MB in fp32, 1429 positions of Cortex's vocabulary. Smaller chunks were slower on CPU (cross
# entropy over 1024 positions, hidden 256, 2 threads: 0.81x plain logits' time, 0.83x with 357 positions, 1.02x with 89)
CHUNK_ELEMENTS = 1 << 26


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's products compute in: autocast's when it is on (as nn.Linear's would), else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def _chunks(num_rows: int, vocab_size: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // vocab_size)
    return [slice(start, start + step) for start in range(0, num_rows, step)]


def _add_chunk_grads(probs, targets, grad_rows, hidden, weight, grad_hidden, grad_weight) -> None:
    """From a chunk's softmax (overwritten), the gradients of sum_r grad_rows[r] * log p_r[targets[r]]: written into
    grad_hidden (its rows), added to grad_weight (fp32). d log p_t / d logits = onehot(t) - softmax(logits)."""
    grad_logits = probs.mul_(-grad_rows)
    grad_logits.scatter_add_(1, targets[:, None], grad_rows)
    grad_logits = grad_logits.to(hidden.dtype)
    grad_hidden.copy_(grad_logits @ weight)
    if grad_logits.dtype == torch.float32:
        grad_weight.addmm_(grad_logits.t(), hidden)
    else:  # bf16/fp16 products, summed over the chunks in fp32
        grad_weight += grad_logits.t() @ hidden


class _TargetLogProbs(torch.autograd.Function):
    """hidden (N, H) and weight (V, H) of one dtype, targets (N,) -> log-probs (N,) and entropies (N,) in fp32, or with
    `summed` the sum of the log-probs, whose gradients are formed in forward.

    A chunk's logits are computed in the inputs' dtype and scored in fp32. Their gradients need them again: for a sum
    (the cross-entropy loss) the upstream gradient is one number, so forward forms them for 1 and backward scales them
    (three projections of the hidden states, as with whole logits); otherwise backward computes the logits again."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, with_entropy, summed):
        scored = targets != IGNORE_INDEX
        targets = targets.clamp(min=0)
        if summed:
            grad_hidden, grad_weight = torch.empty_like(hidden), weight.new_zeros(weight.shape, dtype=torch.float32)
        log_probs = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(log_probs) if with_entropy else log_probs.new_empty(0)
        for rows in _chunks(len(hidden), len(weight)):
            log_softmax = (hidden[rows] @ weight.t()).float().log_softmax(dim=-1)
            log_probs[rows] = log_softmax.gather(1, targets[rows, None]).squeeze(1)
            if with_entropy:
                entropy[rows] = -(log_softmax.exp() * log_softmax).sum(dim=-1)
            if summed:
                _add_chunk_grads(log_softmax.exp_(), targets[rows], scored[rows, None].float(), hidden[rows], weight,
                                 grad_hidden[rows], grad_weight)
        log_probs.masked_fill_(~scored, 0.0)
        ctx.mark_non_differentiable(entropy)
        ctx.summed = summed
        if summed:
            ctx.save_for_backward(grad_hidden, grad_weight)
        else:
            ctx.save_for_backward(hidden, weight, targets, scored)
        return log_probs.sum() if summed else log_probs, entropy

    @staticmethod
    def backward(ctx, grad_output, _grad_entropy):
        if ctx.summed:  # formed in forward for an upstream gradient of 1
            grad_hidden, grad_weight = ctx.saved_tensors
            dtype = grad_hidden.dtype  # that of hidden and weight
            return grad_hidden * grad_output.to(dtype), (grad_weight * grad_output).to(dtype), None, None, None
        hidden, weight, targets, scored = ctx.saved_tensors
        grad_rows = torch.where(scored, grad_output, 0.0)[:, None]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for rows in _chunks(len(hidden), len(weight)):
            probs = (hidden[rows] @ weight.t()).float().softmax(dim=-1)
            _add_chunk_grads(probs, targets[rows], grad_rows[rows], hidden[rows], weight, grad_hidden[rows],
                             grad_weight)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


def target_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False,
                     summed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(hidden @ weight.T)[target] per position, a chunk of positions at a time.

    hidden (..., H), weight (V, H), targets (...) with IGNORE_INDEX where not scored. Returns (log-probs (...) fp32, 0
    where ignored, or with summed their sum (0-d); with_entropy: each position's entropy (...) fp32 without gradient,
    else None)."""
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected {tuple(hidden.shape[:-1])} "
                         "(one per position)")
    dtype = compute_dtype(hidden)
    precompute = summed and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):  # cast here, as nn.Linear would under autocast
        log_probs, entropy = _TargetLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]).to(dtype), weight.to(dtype),
                                                   targets.reshape(-1), with_entropy, precompute)
    entropy = entropy.view(targets.shape) if with_entropy else None
    if precompute:  # already the sum
        return log_probs, entropy
    log_probs = log_probs.view(targets.shape)
    return log_probs.sum() if summed else log_probs, entropy


class LMHead(nn.Linear):
    """The vocabulary projection (`lm_head.weight`, no bias): head(x) gives logits, head(x, targets) target log-probs.
    Both run in this module's forward, around which DeepSpeed ZeRO-3 gathers the weight."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, with_entropy: bool = False,
                summed: bool = False):
        if targets is None:
            return super().forward(x)
        return target_log_probs(x, self.weight, targets, with_entropy, summed)
