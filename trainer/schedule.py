"""Learning-rate schedule: linear warmup from initial_lr to max_lr, then cosine down to min_lr, then flat.

The schedule is a pure function of the optimizer step, so resuming needs nothing but the step count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosineSchedule:
    initial_lr: float
    max_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    @classmethod
    def from_ratio(cls, initial_lr: float, max_lr: float, min_lr: float, total_steps: int, warmup_ratio: float):
        if total_steps < 1:
            raise ValueError(f"the lr schedule needs at least one optimizer step, got total_steps={total_steps} "
                             "(too little data for the batch size, gradient accumulation and number of processes?)")
        return cls(initial_lr, max_lr, min_lr, int(warmup_ratio * total_steps), total_steps)

    def lr_at(self, step: int) -> float:
        """lr for the optimizer update with 0-based index `step`."""
        if step < self.warmup_steps:
            return self.initial_lr + (self.max_lr - self.initial_lr) * step / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps <= 1:
            return self.max_lr if step < self.total_steps else self.min_lr
        progress = min(1.0, (step - self.warmup_steps) / (decay_steps - 1))
        return self.min_lr + (self.max_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
