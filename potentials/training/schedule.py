"""The warmup + cosine learning-rate schedule, driven by whichever budget of the run is spent faster.

A run may be bounded by optimiser steps (``trainer.max_steps``, or ``trainer.max_epochs`` × batches per epoch) and by
training time (``trainer.max_time``).  The schedule is a function of the step *and* of the training time elapsed at
that step, and follows the larger of the two fractions spent, so a run stopped by the clock anneals by then instead
of stopping at its peak rate (``max_epochs=100000 max_time=...``), and a run that ends by its steps first anneals by
its steps, as before:

    warmup   factor = max((s + 1) / W, t / (0.1·B))             while s < W and t < 0.1·B  (linear to the peak)
    cosine   p = max((s − W) / (S − W), (t/B − 0.1) / 0.9)      clipped to [0, 1]
             factor = m + (1 − m)·(1 + cos πp) / 2

with s the step, S the step budget, W the warmup steps (at most S/10), t the training time elapsed at step s, B the
time budget and m ``min_lr_ratio``.  A missing budget drops its term.  Time-driven warmup ends by 10 % of the time
budget at the latest, as step-driven warmup ends by 10 % of the steps; the cosine's time term starts from there, so
the factor is continuous in (s, t), and a run ending by its steps within its time budget (which spends time at a
steady rate) follows its steps throughout.

The scheduler records ``t`` at every step in its state, which is saved in every checkpoint; a resumed run reads the
training time of all attempts together (Lightning's ``Timer`` keeps it) and never less than the recorded value, so
the schedule continues where it stopped.  A time-driven schedule depends on the speed of the machine and is not
bit-reproducible across runs; a step-driven one (no ``max_time``, or ``training.schedule_by=steps``) is a function
of the step alone and stays exact through kills and resumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

#: the fraction of a budget that warmup may take at most
WARMUP_CAP = 0.1


def cosine_factor(step: int, elapsed: float, *, warmup: int, total: int | None, budget: float | None,
                  min_lr_ratio: float) -> float:
    """The learning rate at ``step`` as a fraction of the peak (module docstring); ``elapsed``: training seconds at
    that step; ``total``: the step budget; ``budget``: the time budget, s (None: no such bound)."""
    time_fraction = elapsed / budget if budget else 0.0
    if step < warmup and time_fraction < WARMUP_CAP:  # warmup ends at its last step or at the time cap
        return max((step + 1) / warmup, time_fraction / WARMUP_CAP)
    progress = (step - warmup) / max(total - warmup, 1) if total else 0.0
    if budget:
        progress = max(progress, (time_fraction - WARMUP_CAP) / (1 - WARMUP_CAP))
    progress = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """:func:`cosine_factor` as a per-step scheduler; ``clock()`` gives the training seconds elapsed (over all
    attempts of a resumed run), read once per step and recorded as ``elapsed`` in the state."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup: int, total: int | None, budget: float | None,
                 min_lr_ratio: float, clock: Callable[[], float] | None = None) -> None:
        if total is None and not budget:
            raise ValueError("a cosine schedule needs a step budget or a time budget")
        if budget and clock is None:
            raise ValueError("a time budget needs a clock")
        self.warmup, self.total, self.budget, self.min_lr_ratio = int(warmup), total, budget, float(min_lr_ratio)
        self.clock = clock if budget else None
        self.elapsed = 0.0
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        if self.clock is not None:  # never behind the time recorded at the last step (a resume without the timer)
            self.elapsed = max(float(self.clock()), self.elapsed)
        factor = cosine_factor(self.last_epoch, self.elapsed, warmup=self.warmup, total=self.total,
                               budget=self.budget, min_lr_ratio=self.min_lr_ratio)
        return [base_lr * factor for base_lr in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "clock")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The state of :meth:`state_dict`; a ``LambdaLR`` state of an older checkpoint (no ``elapsed``) too.  The
        budgets stay those of this run's config."""
        keep = {k: v for k, v in state_dict.items()
                if k not in ("lr_lambdas", "warmup", "total", "budget", "min_lr_ratio")}
        self.__dict__.update({"elapsed": 0.0, **keep})
