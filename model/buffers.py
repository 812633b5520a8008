"""Large CPU tensors kept from one step to the next.

glibc serves every allocation over 32 MB with fresh pages from the OS and gives them back on free, so a tensor of tens
of MB made anew each step costs a page fault per 4 KB page when first written: about 11 ms for a 48 MB gradient on the
benchmark machine, ten times a pass over memory that is already mapped. CUDA's caching allocator keeps its blocks
already; these helpers do it on CPU for the few large tensors of a step (the head's logits chunks and the (V, H)
gradients of the embedding and the head).
"""

import math
import threading

import torch

_kept = threading.local()  # per thread: no two threads ever share a buffer


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised buffer for use within one call (never handed out of it). On CPU it is kept for the next call."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    kept = getattr(_kept, name, None)
    if kept is None or kept.dtype != dtype or kept.numel() < math.prod(shape):
        kept = torch.empty(math.prod(shape), dtype=dtype)
        setattr(_kept, name, kept)
    return kept[: math.prod(shape)].view(shape)


def recycled(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor that the caller hands out, such as a gradient that autograd stores in `.grad`.

    On CPU it reuses the memory it gave out last time under this name once nothing holds that memory any more (the
    previous step's gradient was dropped by zero_grad(set_to_none=True)); while anything does (a gradient still being
    accumulated, a tensor kept by the caller), it makes a new one. The kept tensor itself is never handed out, only a
    view of it: autograd stores a gradient in `.grad` without copying only when no other tensor object refers to it.
    (Ownership is read from the storage's reference count, as torch's CUDA-graph trees do for their outputs: tensors and
    views count, so only someone holding nothing but the untyped storage object of a dropped gradient would go unseen.)"""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    kept = getattr(_kept, name, None)
    # 2 = the kept tensor + the storage object made for the count; any other tensor or view adds one
    if kept is None or kept.shape != shape or kept.dtype != dtype or _storage_owners(kept) > 2:
        kept = torch.empty(shape, dtype=dtype)
        setattr(_kept, name, kept)
    return kept.view(shape)


def _storage_owners(tensor: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)
