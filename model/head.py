"""The output head: logits, or log-probabilities of given target tokens computed in chunks of positions.

Scoring targets is what training (cross entropy, GRPO and DPO log-probs) and evaluation need, and it does not need the
(N, V) logits: with Cortex's 46957-token vocabulary they are the largest tensors of a step (8 x 2048 positions: 3 GB in
fp32, and as much again for their gradient). `target_log_probs` projects a chunk of positions at a time and keeps only
what the result and its gradient need, so memory no longer grows with N x V and no pass re-reads logits from the whole
step. For a summed score (the cross-entropy loss) the gradients are formed in forward, which holds one weight-sized fp32
gradient until backward.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .buffers import recycled, scratch

IGNORE_INDEX = -100  # a target that is not scored: log-prob 0, no gradient
# Logits per chunk (64M: 256 MB in fp32, 1429 positions of Cortex's vocabulary). Memory stays bounded whatever the number
# of positions; bigger chunks make the three products faster (bench_model's train step: 5% slower with 357 positions).
CHUNK_ELEMENTS = 1 << 26
# log(p) of a probability at or above this is exact to fp32 rounding (exp(logit - max) is then a normal float)
_SMALLEST_EXACT_PROB = 1e-30


def chunk_positions(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the projection computes in: autocast's when it is on (as nn.Linear would), else the weight's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, computed in a's dtype and stored in out's."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


class _ChunkBuffers:
    """Scratch tensors reused by every chunk (and, on CPU, by later calls; see buffers.scratch).

    logits: fp32 (chunk, V), where softmax and gradients are formed. When the projection computes in a lower precision
    (bf16/fp16 weights or autocast), `low` (chunk, V) receives the matrix products and the gradient cast for the next
    ones, and `weight_product` (V, H) each chunk's weight gradient, which is added to the fp32 sum through an fp32 copy
    (`weight_product_fp32`): elementwise ops that mix dtypes are several times slower on CPU than a copy and a same-dtype
    op."""

    def __init__(self, step: int, weight: torch.Tensor, with_weight_grad: bool):
        vocab_size, device = weight.shape[0], weight.device
        self.logits = scratch("logits", (step, vocab_size), torch.float32, device)
        low_precision = weight.dtype != torch.float32
        self.low = scratch("low", (step, vocab_size), weight.dtype, device) if low_precision else None
        self.weight_product = self.weight_product_fp32 = None
        if low_precision and with_weight_grad:
            self.weight_product = scratch("weight_product", tuple(weight.shape), weight.dtype, device)
            self.weight_product_fp32 = scratch("weight_product_fp32", tuple(weight.shape), torch.float32, device)

    def project(self, hidden_rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """fp32 logits of a chunk (a view of the buffer)."""
        logits = self.logits[: len(hidden_rows)]
        if self.low is None:
            return torch.mm(hidden_rows, weight.t(), out=logits)
        return logits.copy_(torch.mm(hidden_rows, weight.t(), out=self.low[: len(hidden_rows)]))

    def gradients(self, probs, targets, row_grad, hidden_rows, weight, grad_hidden_rows, grad_weight, first: bool):
        """From a chunk's softmax probs (c, V), overwritten: the gradients of sum_r g_r log p_r[t_r] for its hidden rows
        (written) and for the weight (accumulated over chunks, fp32).

        With d = p - onehot(t) (the one-hot is c subtractions, not a pass over the chunk), the gradient of the logits
        is -g d, and g is applied to the small (c, H) operands: grad_hidden = -g (d @ W), grad_weight += d^T (-g h)."""
        rows = torch.arange(len(probs), device=probs.device)
        probs.index_put_((rows, targets), probs.new_tensor(-1.0), accumulate=True)
        if self.low is not None:
            probs = self.low[: len(probs)].copy_(probs)
        mm_into(grad_hidden_rows, probs, weight)  # fp32 hidden under autocast: a small (c, H) cast
        grad_hidden_rows.mul_(-row_grad[:, None])
        scaled_hidden = hidden_rows * -row_grad[:, None].to(hidden_rows.dtype)
        if self.weight_product is not None:
            product = torch.mm(probs.t(), scaled_hidden, out=self.weight_product)
            grad_weight.copy_(product) if first else grad_weight.add_(self.weight_product_fp32.copy_(product))
        elif first:
            torch.mm(probs.t(), scaled_hidden, out=grad_weight)
        else:
            grad_weight.addmm_(probs.t(), scaled_hidden)


def _softmax(logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Softmax over the vocabulary into `out`, which may be `logits` itself: one fused kernel that keeps each row in
    cache (versus five passes over the chunk for max, subtract, exp, sum and divide)."""
    return torch._softmax(logits, -1, False, out=out)


class _TargetLogProbs(torch.autograd.Function):
    """hidden (N, H), weight (V, H), targets (N,) -> log-probs (N,) fp32 (or their sum when `summed`), entropy (N,).

    Per chunk of positions: logits, the target's logit, the softmax in place and from it the log-sum-exp
    (lse = logit_t - log p_t; see below). The gradient of log p_t with respect to the logits is onehot(t) - softmax.
    When only the sum of the log-probs is wanted (the cross-entropy loss), the upstream gradient is one scalar, so the
    chunk's gradients are formed right away and scaled in backward (three projections in all, as the plain path).
    Per-position log-probs get any upstream gradient, so backward recomputes each chunk's logits (four projections)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, summed, with_entropy, precompute):
        hidden_c, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
        scored = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)
        row_grad = scored.float()  # the upstream gradient of sum(log-probs), per position
        num_positions, vocab_size = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.empty_like(hidden) if precompute else None
        grad_weight = recycled("head_weight_grad", weight.shape, torch.float32, weight.device) if precompute else None
        log_sum_exp = torch.empty(num_positions, dtype=torch.float32, device=hidden.device)
        target_logits = torch.empty_like(log_sum_exp)
        target_probs = None if with_entropy else torch.empty_like(log_sum_exp)
        entropy = torch.empty_like(log_sum_exp) if with_entropy else log_sum_exp.new_empty(0)
        step = min(chunk_positions(vocab_size), num_positions)
        buffers = _ChunkBuffers(step, weight_c, with_weight_grad=precompute)
        probs_buffer = scratch("probs", tuple(buffers.logits.shape), torch.float32, hidden.device) if with_entropy else None
        for start in range(0, num_positions, step):
            rows = slice(start, start + step)
            logits = buffers.project(hidden_c[rows], weight_c)
            target_logits[rows] = logits.gather(1, safe_targets[rows, None]).squeeze(1)
            if with_entropy:
                # The logits are kept. Both maxima sit at the same entry, where p = 1 / sum(exp(logit - max)) >= 1 / V,
                # so lse = max logit - log(max p) exactly; and H = lse - sum_v p_v * logit_v.
                probs = _softmax(logits, out=probs_buffer[: len(logits)])
                log_sum_exp[rows] = logits.amax(dim=-1) - probs.amax(dim=-1).log()
                entropy[rows] = log_sum_exp[rows] - torch.bmm(probs[:, None, :], logits[:, :, None]).view(-1)
            else:
                probs = _softmax(logits, out=logits)
                target_probs[rows] = probs.gather(1, safe_targets[rows, None]).squeeze(1)
            if precompute:
                buffers.gradients(probs, safe_targets[rows], row_grad[rows], hidden_c[rows], weight_c,
                                  grad_hidden[rows], grad_weight, first=start == 0)
        if not with_entropy:
            # lse = logit_t - log p_t, exact to fp32 rounding while p_t is a normal number; scored rows whose target is
            # less likely than that (a loss over 69) get theirs from their logits, computed again
            log_sum_exp.copy_(target_logits - target_probs.log())
            inexact = scored & (target_probs < _SMALLEST_EXACT_PROB)
            if inexact.any():
                rows = inexact.nonzero().squeeze(1)
                log_sum_exp[rows] = (hidden_c[rows] @ weight_c.t()).float().logsumexp(dim=-1)
        log_probs = torch.where(scored, target_logits - log_sum_exp, 0.0)
        ctx.mark_non_differentiable(entropy)
        ctx.precompute, ctx.backward_done = precompute, False
        if precompute:
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
            return log_probs.sum(), entropy
        ctx.save_for_backward(hidden, targets)
        # The weight is kept as the Parameter object, not saved as a tensor: under DeepSpeed ZeRO-3 its storage is
        # released after forward and gathered again before this module's backward, and backward must see that one.
        ctx.weight, ctx.compute_dtype = weight, compute_dtype
        return (log_probs.sum() if summed else log_probs), entropy

    @staticmethod
    def backward(ctx, grad_output, _grad_entropy):
        if ctx.precompute:  # gradients formed in forward for an upstream gradient of 1, scaled in place
            if ctx.backward_done:
                raise RuntimeError("a summed target log-prob (sum_target_log_probs=True) can be backpropagated only once "
                                   "(its gradients are scaled in place): recompute it instead of retain_graph=True")
            ctx.backward_done = True
            grad_hidden, grad_weight = ctx.saved_tensors
            scaled_weight_grad = grad_weight.mul_(grad_output).to(ctx.weight_dtype)
            return grad_hidden.mul_(grad_output), scaled_weight_grad, None, None, None, None, None
        hidden, targets = ctx.saved_tensors
        weight, compute_dtype = ctx.weight, ctx.compute_dtype
        hidden_c, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
        row_grad = torch.where(targets != IGNORE_INDEX, grad_output, 0.0).float()
        safe_targets = targets.clamp(min=0)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = recycled("head_weight_grad", weight.shape, torch.float32, weight.device)
        num_positions, vocab_size = hidden.shape[0], weight.shape[0]
        step = min(chunk_positions(vocab_size), num_positions)
        buffers = _ChunkBuffers(step, weight_c, with_weight_grad=True)
        for start in range(0, num_positions, step):
            rows = slice(start, start + step)
            logits = buffers.project(hidden_c[rows], weight_c)
            probs = _softmax(logits, out=logits)
            buffers.gradients(probs, safe_targets[rows], row_grad[rows], hidden_c[rows], weight_c, grad_hidden[rows],
                              grad_weight, first=start == 0)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def target_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, summed: bool = False,
                     with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(hidden @ weight.T)[target] per position, without materialising all logits.

    hidden (..., H), weight (V, H), targets (...) long with IGNORE_INDEX for unscored positions.
    Returns (log-probs (...) fp32, 0 where ignored, or their sum (0-d) when summed; the entropy of each position's
    distribution (...) fp32, without gradient, when with_entropy, else None)."""
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected {tuple(hidden.shape[:-1])} (one per position)")
    compute_dtype = matmul_dtype(hidden, weight)
    # For a sum, gradients are formed in forward, so only when they will be wanted
    precompute = summed and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):  # the function casts for itself
        log_probs, entropy = _TargetLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                                   compute_dtype, summed, with_entropy, precompute)
    if not summed:
        log_probs = log_probs.view(targets.shape)
    return log_probs, entropy.view(targets.shape) if with_entropy else None


class LMHead(nn.Linear):
    """The vocabulary projection (state-dict key `lm_head.weight`, no bias).

    head(x) gives logits; head(x, targets, ...) gives target log-probs (see target_log_probs). Both run through this
    module's forward so that DeepSpeed ZeRO-3, which gathers a module's parameters around its forward, sees the weight
    in use."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, summed: bool = False,
                with_entropy: bool = False):
        if targets is None:
            return F.linear(x, self.weight)
        return target_log_probs(x, self.weight, targets, summed, with_entropy)
