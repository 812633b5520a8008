"""The output head: logits, or each position's log-probability of a target token computed a chunk of positions at a
time, so the (batch, seq, vocabulary) logits are never materialised (the fused linear + cross-entropy idea)."""

import torch
from torch import nn

IGNORE_INDEX = -100  # a target that is not scored: log-prob 0, no gradient
CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 256 MB in fp32, 1429 positions of Cortex's vocabulary


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's products compute in: autocast's when it is on (as nn.Linear's would), else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def _chunks(num_rows: int, vocab_size: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // vocab_size)
    return [slice(start, start + step) for start in range(0, num_rows, step)]


def _score_chunk(hidden, weight, targets, with_entropy):
    """-> log p[target] (n,), entropy (n,) or None, exp(logits - max) (V, n) fp32 and its column sums (n,).
    (V, n), not (n, V): MKL's product writes that layout faster (1.5x at hidden 256)."""
    logits = (weight @ hidden.t()).float()
    logits -= logits.amax(dim=0)  # in place: one (V, n) buffer per chunk
    target_logits = logits.gather(0, targets[None, :]).squeeze(0)
    exp = logits.exp() if with_entropy else logits.exp_()
    sums = exp.sum(dim=0)
    entropy = sums.log() - logits.mul_(exp).sum(dim=0) / sums if with_entropy else None  # -sum p log p
    return target_logits - sums.log(), entropy, exp, sums


def _add_chunk_grads(exp, sums, targets, grad_rows, hidden, weight, grad_hidden, grad_weight) -> None:
    """Gradients of sum_r grad_rows[r] * log p_r[targets[r]], whose logits' gradient is grad_r * (onehot - exp / sum):
    the row factors scale the (n, H) hidden states rather than the (V, n) chunk. grad_hidden's rows are written,
    grad_weight (fp32) is added to."""
    scale = (grad_rows / sums)[:, None]
    exp = exp.to(hidden.dtype)
    grad_hidden.copy_(weight[targets] * grad_rows[:, None] - (exp.t() @ weight) * scale)
    grad_weight.index_add_(0, targets, hidden.float() * grad_rows[:, None])
    scaled_hidden = (hidden * scale).to(hidden.dtype)
    if hidden.dtype == torch.float32:
        grad_weight.addmm_(exp, scaled_hidden, alpha=-1)
    else:  # bf16/fp16 products, summed over the chunks in fp32
        grad_weight -= exp @ scaled_hidden


class _TargetLogProbs(torch.autograd.Function):
    """hidden (N, H), weight (V, H), targets (N,) -> fp32 log-probs (N,) and entropies (N,), or with `summed` their sum.
    A sum's upstream gradient is one number, so forward forms its gradients for 1 and backward scales them (three
    projections, as with whole logits); otherwise backward computes the logits again (four)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, with_entropy, summed):
        scored = targets != IGNORE_INDEX
        targets = targets.clamp(min=0)
        if summed:
            grad_hidden, grad_weight = torch.empty_like(hidden), weight.new_zeros(weight.shape, dtype=torch.float32)
        log_probs = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(log_probs) if with_entropy else log_probs.new_empty(0)
        for rows in _chunks(len(hidden), len(weight)):
            log_probs[rows], chunk_entropy, exp, sums = _score_chunk(hidden[rows], weight, targets[rows], with_entropy)
            if with_entropy:
                entropy[rows] = chunk_entropy
            if summed:
                _add_chunk_grads(exp, sums, targets[rows], scored[rows].float(), hidden[rows], weight,
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
        grad_rows = torch.where(scored, grad_output, 0.0)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for rows in _chunks(len(hidden), len(weight)):
            _, _, exp, sums = _score_chunk(hidden[rows], weight, targets[rows], with_entropy=False)
            _add_chunk_grads(exp, sums, targets[rows], grad_rows[rows], hidden[rows], weight, grad_hidden[rows],
                             grad_weight)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


def target_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False,
                     summed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(hidden @ weight.T)[target] per position: hidden (..., H), weight (V, H), targets (...) (IGNORE_INDEX:
    not scored) -> (fp32 log-probs (...), 0 where ignored, or with summed their sum; entropies (...) or None)."""
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected {tuple(hidden.shape[:-1])} "
                         "(one per position)")
    dtype = compute_dtype(hidden)
    precompute = summed and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):  # cast here, as nn.Linear would under autocast
        log_probs, entropy = _TargetLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]).to(dtype), weight.to(dtype),
                                                   targets.reshape(-1), with_entropy, precompute)
    if not precompute:  # else already the sum
        log_probs = log_probs.sum() if summed else log_probs.view(targets.shape)
    return log_probs, entropy.view(targets.shape) if with_entropy else None


class LMHead(nn.Linear):
    """`lm_head`: head(x) gives logits, head(x, targets) target log-probs, both in the forward ZeRO-3 gathers around."""

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, with_entropy: bool = False,
                summed: bool = False):
        if targets is None:
            return super().forward(x)
        return target_log_probs(x, self.weight, targets, with_entropy, summed)
