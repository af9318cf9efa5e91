"""The one attack loop: projected gradient ascent (PGD) on any per-row objective.

Used by adversarial training, unit sensitivity, classification robustness and transfer.

    res = pgd_attack(forward, x, objective, eps=1.0, norm="l2", steps=10)
    res.x_adv   # (B, C, H, W) best iterate per row, in [0, 1] and within eps of x
    res.value   # (B,) objective at x_adv (the engine maximizes)

Two schedules:

- ``"pgd"`` (Madry et al.): random start in the ball, ``steps`` steps of fixed size (default
  ``2.5 * eps / steps``), exact projection onto ball ∩ [0, 1] box after each step (see ``steps``).
- ``"guo"`` (Guo et al. 2022, sec. 3.2): two phases, first in a ball of radius ``2 eps`` then in the ball
  of radius ``eps`` (the relaxed first phase explores). The paper says "250 steps ... first with a ball of
  radius 2 eps and finally with one of radius eps" and "for each optimization loop of 250 steps", which reads
  either as 250 in all or as 250 per phase. ``steps_per_phase=False`` (the default) takes the first reading:
  the budget of ``steps`` gradient evaluations is split, ``steps // 2`` at ``2 eps`` and the rest at
  ``eps``; ``steps_per_phase=True`` takes the second: ``steps`` in each phase, ``2 * steps`` in all. Each phase is split into up to 4 cycles of simulated annealing: the step size
  starts at ``eps`` (or ``step_size`` when given) and is cut by 10% after every iteration that makes no
  progress (the new iterate is not better than the row's best; the next step then starts again
  from the best iterate). Each new cycle resets the step size of the rows that made progress in
  the previous one; a row that made none keeps annealing, since a reset would only repeat the same
  failed proposals. Every row spends exactly ``steps`` gradient evaluations, as plain PGD does (``2 * steps``
  with ``steps_per_phase=True``).

Restarts and all rows share one batch: input rows are repeated ``restarts`` times along the batch
axis; every row keeps its best iterate; the best restart of each input row is returned. The victim
module runs in eval mode with ``requires_grad=False`` on its parameters during the attack; both
are restored afterwards, and gradients are taken only w.r.t. the input (``torch.autograd.grad``), so
no ``.grad`` ever accumulates on the model.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from neuroguide.attacks.eps import check_eps_units
from neuroguide.attacks.steps import AttackerStep, get_step_class, per_row
from neuroguide.models.features import evaluation_mode

SCHEDULES = ("pgd", "guo")
GUO_CYCLES = 4
GUO_DECAY = 0.9


@dataclass
class AttackResult:
    """Output of :func:`pgd_attack`.

    Attributes:
        x_adv: (B, C, H, W) the best iterate of each input row (over steps and restarts).
        value: (B,) the objective at ``x_adv``.
        restart_values: (R, B) the best value reached by each restart.
        grad_evals: gradient evaluations spent, summed over all rows and restarts.
    """

    x_adv: torch.Tensor
    value: torch.Tensor
    restart_values: torch.Tensor
    grad_evals: int


def _check_eps(eps: float | torch.Tensor, n: int, norm: str = "l2") -> float | torch.Tensor:
    """``eps`` checked: finite, >= 0, one per row if a tensor; a Linf eps >= 1 (the whole [0, 1] pixel range) is
    refused by :func:`neuroguide.attacks.eps.check_eps_units` (no warning here: the callers warn, naming the key)."""
    if isinstance(eps, torch.Tensor) and eps.ndim > 0:
        if eps.shape != (n,):
            raise ValueError(f"eps: expected a float or a ({n},) tensor (one radius per input row), "
                             f"got {tuple(eps.shape)}")
        if not torch.isfinite(eps).all() or (eps < 0).any():
            raise ValueError(f"eps: every radius must be finite and >= 0, got min {eps.min().item():g}")
        check_eps_units(float(eps.max()), norm, "eps", warn=False)
        return eps
    e = float(eps)
    if not math.isfinite(e) or e < 0:
        raise ValueError(f"eps must be a finite number >= 0 (L2 in [0,1] pixel units, Linf as k/255); got {eps!r}")
    return check_eps_units(e, norm, "eps", warn=False)


def _check_inputs(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError(f"x: expected a (B, C, H, W) image tensor, got {type(x).__name__} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"x: images must be in [0, 1] pixel space (models normalize internally); found values in "
                         f"[{lo:.3g}, {hi:.3g}]. Undo the normalization before attacking.")


def _value_and_grad(forward, objective, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Objective (B,) and its gradient w.r.t. ``x`` only (B, C, H, W)."""
    x = x.detach().requires_grad_(True)
    value = objective(forward(x), rows)
    if value.shape != (x.shape[0],):
        raise ValueError(f"objective must return one value per row, shape ({x.shape[0]},); got {tuple(value.shape)}. "
                         "Use reduction='none' (see neuroguide.attacks.objectives)")
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad.detach()


@torch.no_grad()
def _value(forward, objective, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return objective(forward(x), rows).detach()


def _keep_best(best_x, best_v, x, v):
    better = v > best_v
    mask = better.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.where(mask, x, best_x), torch.where(better, v, best_v), better


def _run_pgd(forward, objective, x0, rows, eps, Step, steps, step_size, random_start, generator):
    """Plain PGD on one chunk: returns (best_x, best_v, grad_evals)."""
    alpha = step_size if step_size is not None else 2.5 * per_row(eps, x0).flatten() / max(steps, 1)
    S: AttackerStep = Step(x0, eps, alpha)
    x = S.random_perturb(x0, generator) if random_start else x0.clone()
    best_x, best_v = x.clone(), torch.full((x.shape[0],), -math.inf, device=x.device)
    for _ in range(steps):
        v, g = _value_and_grad(forward, objective, x, rows)
        best_x, best_v, _ = _keep_best(best_x, best_v, x, v)
        x = S.project(S.step(x, g))
    best_x, best_v, _ = _keep_best(best_x, best_v, x, _value(forward, objective, x, rows))
    return best_x, best_v, steps * x.shape[0]


def _split(n: int, parts: int) -> list[int]:
    """``n`` steps in up to ``parts`` cycles as equal as possible (no empty cycles)."""
    parts = max(1, min(parts, n))
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)] if n > 0 else []


def guo_phase_steps(steps: int, steps_per_phase: bool = False) -> list[int]:
    """Gradient evaluations per phase of the Guo schedule: ``[at 2 eps, at eps]``, or ``[at eps]`` alone when
    there is no room for two phases (``steps < 2`` split, ``steps == 0`` per phase)."""
    if steps_per_phase:
        return [steps, steps] if steps >= 1 else [0]
    n1 = steps // 2 if steps >= 2 else 0
    return [n1, steps - n1] if n1 else [steps]


def _run_guo(forward, objective, x0, rows, eps, Step, steps, step_size, random_start, generator,
             steps_per_phase: bool = False):
    """Guo et al. schedule on one chunk: returns (best_x, best_v, grad_evals)."""
    B = x0.shape[0]
    col = (-1,) + (1,) * (x0.ndim - 1)
    eps_rows = per_row(eps, x0).flatten()
    alpha0 = eps_rows.clone() if step_size is None else per_row(step_size, x0).flatten().clone()
    counts = guo_phase_steps(steps, steps_per_phase)
    radii = [2 * eps_rows, eps_rows] if len(counts) == 2 else [eps_rows]
    phases = list(zip(radii, counts))
    x = Step(x0, phases[0][0], alpha0).random_perturb(x0, generator) if random_start else x0.clone()
    for radius, n in phases:
        S: AttackerStep = Step(x0, radius, alpha0.clone())
        x = S.project(x)  # the previous phase's best, into this ball
        best_x, best_v = x.clone(), torch.full((B,), -math.inf, device=x.device)
        best_g = torch.zeros_like(x)
        improved = torch.ones(B, dtype=torch.bool, device=x.device)
        for c, length in enumerate(_split(n, GUO_CYCLES)):
            if c > 0:  # a new cycle from the best iterate: rows that made progress restart at the initial step
                # size; rows that made none keep annealing (a restart would repeat the same failed proposals)
                S.step_size = torch.where(improved, alpha0, S.step_size)
                x = S.project(S.step(best_x, best_g))
            improved = torch.zeros(B, dtype=torch.bool, device=x.device)
            for _ in range(length):
                v, g = _value_and_grad(forward, objective, x, rows)
                best_x, best_v, better = _keep_best(best_x, best_v, x, v)
                best_g = torch.where(better.reshape(col), g, best_g)
                improved |= better
                S.step_size = torch.where(better, S.step_size, S.step_size * GUO_DECAY)  # no progress: cut by 10%
                x = S.project(S.step(best_x, best_g))  # the next proposal, from the best iterate
        # the last proposal has not been evaluated yet
        best_x, best_v, _ = _keep_best(best_x, best_v, x, _value(forward, objective, x, rows))
        x = best_x
    return best_x, best_v, sum(counts) * B


def pgd_attack(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, objective: Callable, *,
               eps: float | torch.Tensor, norm: str = "l2", steps: int = 10,
               step_size: float | torch.Tensor | None = None, random_start: bool = True, restarts: int = 1,
               schedule: str = "pgd", steps_per_phase: bool = False, victim: nn.Module | None = None,
               batch_size: int | None = None, generator: torch.Generator | None = None) -> AttackResult:
    """Maximize ``objective(forward(x + d), rows)`` per row over ``||d|| <= eps``, ``x + d`` in [0, 1].

    Args:
        forward: (B, C, H, W) in [0, 1] -> (B, K), e.g. a model or ``LayerOutput(model, "avgpool")``.
        x: (B, C, H, W) clean images in [0, 1].
        objective: per-row objective ``(outputs (B, K), rows (B,)) -> (B,)`` (see ``objectives``).
        eps: radius, a float or a (B,) tensor (one per row). L2 in [0, 1] pixel units; Linf as k/255.
        norm: "l2" (normalized-gradient steps) or "linf" (signed-gradient steps).
        steps: gradient evaluations per row and restart (with ``steps_per_phase``: per phase of the Guo schedule).
        step_size: PGD step size (default ``2.5 * eps / steps``, Madry et al.); for the Guo schedule the
            initial step size (default ``eps``). A float or a (B,) tensor.
        random_start: start at a uniform random point of the ball (else at ``x``).
        restarts: independent runs per row, stacked along the batch axis; the best is kept.
        schedule: "pgd" or "guo" (see the module docstring).
        steps_per_phase: Guo schedule only: False (default) splits ``steps`` over its two phases (``steps // 2``
            at ``2 eps``, the rest at ``eps``); True runs ``steps`` in each (see the module docstring).
        victim: module put in eval mode with frozen parameters during the attack and restored after;
            default ``forward`` when it is an ``nn.Module``.
        batch_size: at most this many rows (inputs x restarts) per forward pass (default: all at once).
        generator: a torch.Generator for reproducible random starts.

    Returns:
        :class:`AttackResult` with ``x_adv`` (B, C, H, W), ``value`` (B,), ``restart_values`` (R, B).
    """
    _check_inputs(x)
    B = x.shape[0]
    eps = _check_eps(eps, B, norm)
    if isinstance(eps, torch.Tensor):
        eps = eps.to(device=x.device, dtype=x.dtype) if eps.ndim else float(eps)
    Step = get_step_class(norm)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not known: expected one of {SCHEDULES}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if int(restarts) != restarts or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
    if step_size is not None and not isinstance(step_size, torch.Tensor) and not float(step_size) > 0:
        raise ValueError(f"step_size must be > 0 (or None for the default), got {step_size!r}")
    steps, restarts = int(steps), int(restarts)
    if victim is None and isinstance(forward, nn.Module):
        victim = forward
    if not isinstance(steps_per_phase, bool):
        raise ValueError(f"steps_per_phase must be true or false, got {steps_per_phase!r}")
    if steps_per_phase and schedule != "guo":
        raise ValueError(f"steps_per_phase=True needs schedule='guo' (its two phases, 2 eps then eps); schedule "
                         f"{schedule!r} has one phase: set steps_per_phase=False (e.g. eval.sensitivity.steps_per_phase=false) or "
                         f"schedule='guo'")
    run = functools.partial(_run_guo, steps_per_phase=steps_per_phase) if schedule == "guo" else _run_pgd

    rows_all = torch.arange(B, device=x.device).repeat(restarts)  # restart-major: row r*B + b is input b
    chunk = batch_size or rows_all.numel()
    if chunk < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    best_x, best_v, evals = [], [], 0
    with contextlib.ExitStack() as stack:
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(evaluation_mode(victim))
        x = x.detach().clone()  # a normal tensor even if x was made under inference mode
        for start in range(0, rows_all.numel(), chunk):
            rows = rows_all[start:start + chunk]
            x0 = x[rows]
            e = eps[rows] if isinstance(eps, torch.Tensor) else eps
            s = step_size
            if isinstance(step_size, torch.Tensor) and step_size.ndim:
                s = step_size[rows.to(step_size.device)]
            bx, bv, n = run(forward, objective, x0, rows, e, Step, steps, s, random_start, generator)
            best_x.append(bx.detach())
            best_v.append(bv)
            evals += n
    xs = torch.cat(best_x).reshape(restarts, B, *x.shape[1:])
    vs = torch.cat(best_v).reshape(restarts, B)
    pick = vs.argmax(dim=0)
    ar = torch.arange(B, device=x.device)
    return AttackResult(x_adv=xs[pick, ar], value=vs[pick, ar], restart_values=vs, grad_evals=evals)
