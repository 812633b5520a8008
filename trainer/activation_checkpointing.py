"""Activation checkpointing per transformer block, applied from the trainer side (model/ knows nothing of it).

Each block of `model.layers` keeps only its inputs in forward; its inner activations (attention, MoE routing and
experts) are recomputed during backward by torch.utils.checkpoint (non-reentrant). What that means for the pieces of a step:
  - the aux loss: the block's output is computed once; the recompute only refills saved tensors, so the loss the
    model sums over layers is never counted twice;
  - dropout: checkpoint saves the RNG state and restores it for the recompute, so the masks are the same;
  - forward hooks that count things (the router statistics, trainer/metrics.py) ask `is_recomputing()` and skip the
    recompute;
  - DeepSpeed ZeRO-3: the recompute calls the submodules again, and their hooks gather the partitioned weights again.
Parameter names do not change (the block's `forward` is replaced on the instance, nothing is wrapped), so checkpoints
and state dicts are the same with and without it. Eval, generation and no-grad forwards run the block as it is.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch.utils.checkpoint import checkpoint

_state = threading.local()  # the recompute runs in the thread that runs backward


def is_recomputing() -> bool:
    """True while a checkpointed block's forward is being run again in backward."""
    return getattr(_state, "recomputing", False)


@contextlib.contextmanager
def _recomputing():
    previous = is_recomputing()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = previous


def _contexts():
    """(context of the first forward, context of the recompute) for torch.utils.checkpoint's context_fn."""
    return contextlib.nullcontext(), _recomputing()


def _checkpointed_forward(block: torch.nn.Module, forward, *args, **kwargs):
    if not (block.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block of model.layers in backward instead of keeping its activations."""
    for block in model.layers:
        if isinstance(block.forward, functools.partial):
            raise RuntimeError("activation checkpointing is already enabled on this model")
        block.forward = functools.partial(_checkpointed_forward, block, block.forward)
