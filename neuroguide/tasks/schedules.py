"""Learning-rate schedules, stepped per batch, for every task (``task.scheduler``)."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("none", "cosine", "step")


def configure_schedule(opt: torch.optim.Optimizer, sched: dict, trainer) -> object:
    """What ``configure_optimizers`` returns: ``opt`` alone, or with a per-step LambdaLR of :func:`lr_factor`."""
    sched = dict(sched or {})
    name = sched.get("name") or "none"
    if name not in SCHEDULES:
        raise ValueError(f"task.scheduler.name must be one of {SCHEDULES}; got {name!r}")
    if name == "none" and not float(sched.get("warmup_epochs") or 0):
        return opt
    s = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor({**sched, "name": name}, *_steps(trainer)))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step"}}


def _steps(trainer) -> tuple[int, int]:
    """(optimizer steps of the whole run, optimizer steps per epoch)."""
    epochs = max(1, int(trainer.max_epochs or 1))
    total = trainer.estimated_stepping_batches
    total = max(1, int(total)) if math.isfinite(total) else epochs
    return total, max(1, math.ceil(total / epochs))


def lr_factor(sched: dict, total_steps: int, steps_per_epoch: int):
    """Multiplier of the base learning rate at optimizer step ``k`` (0-based), stepped per batch.

    Linear warm-up over ``warmup_epochs`` (may be fractional): ``(k + 1) / W`` for the first
    ``W = round(warmup_epochs * steps_per_epoch)`` steps; then ``cosine``: ``0.5 * (1 + cos(pi * t))``
    with ``t`` going from 0 to 1 over the remaining steps (the per-step form of cosine annealing to 0),
    or ``step``: ``gamma ** (number of milestones (epochs) <= the step's epoch)``, or ``none``: 1.
    """
    name = sched.get("name") or "none"
    warm = int(round(float(sched.get("warmup_epochs") or 0) * steps_per_epoch))
    warm = min(warm, max(total_steps - 1, 0))
    milestones = sorted(int(m) for m in sched.get("milestones") or [])
    gamma = float(sched.get("gamma", 0.1))

    def factor(k: int) -> float:
        if k < warm:
            return (k + 1) / warm
        if name == "cosine":
            t = (k - warm) / max(1, total_steps - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        if name == "step":
            epoch = k // steps_per_epoch
            return gamma ** sum(epoch >= m for m in milestones)
        return 1.0

    return factor
