"""RMSNorm as Cortex computes it: normalise in fp32, cast back to the input dtype, then multiply by the weight."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The weight is applied after the cast back; with an fp32 weight the output is promoted to fp32 (as in the reference)
        if x.dtype == torch.float32:  # nothing to cast (the common inference case; saves two dispatches per call)
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
