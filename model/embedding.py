"""The token embedding (state-dict key `embed_tokens.weight`)."""

import torch
import torch.nn.functional as F
from torch import nn

from .buffers import recycled


class _EmbeddingWithRecycledGrad(torch.autograd.Function):
    """F.embedding whose (V, H) weight gradient is written into memory kept from the previous step (buffers.recycled)
    rather than into newly mapped pages (at 46957 x 256 fp32: ~11 ms of page faults per step on CPU for a gradient
    that is zero but for the rows of the batch's tokens)."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        # Shape and dtype, not the weight: under DeepSpeed ZeRO-3 its storage is released after forward
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out):
        ids, = ctx.saved_tensors
        grad_weight = recycled("embedding_grad", ctx.weight_shape, ctx.weight_dtype, grad_out.device).zero_()
        grad_weight.index_add_(0, ids.reshape(-1), grad_out.reshape(-1, ctx.weight_shape[1]).to(ctx.weight_dtype))
        return None, grad_weight


class TokenEmbedding(nn.Embedding):
    """nn.Embedding(vocab_size, hidden_size), with the recycled gradient when it trains in fp32 on CPU."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Only for an fp32 weight on CPU: CUDA's allocator reuses its memory already, and for bf16/fp16 weights torch's
        # own backward decides how repeated tokens' gradients are summed
        trains = torch.is_grad_enabled() and self.weight.requires_grad
        if trains and self.weight.device.type == "cpu" and self.weight.dtype == torch.float32:
            return _EmbeddingWithRecycledGrad.apply(ids, self.weight)
        return F.embedding(ids, self.weight)
