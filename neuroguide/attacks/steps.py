"""Steps of projected gradient ascent in [0, 1] pixel space, one class per threat model.

In the manner of MadryLab's ``robustness.attack_steps``: a step object holds the clean input
``x0`` (B, C, H, W), the radius ``eps`` and the step size, and knows how to

- ``random_perturb(x)``: draw a random start inside the ball (and inside [0, 1]),
- ``step(x, g)``: move along the ascent direction of the gradient ``g``,
- ``project(x)``: return to ``{x' : ||x' - x0|| <= eps} ∩ [0, 1]^d``.

``eps`` and ``step_size`` may be Python floats or (B,) tensors (one value per row), so rows with
different radii and annealed step sizes share one batch. Both are plain attributes: the Guo et al.
schedule changes them between iterations.

Clipping to [0, 1] after the projection keeps the iterate inside the ball: ``x0`` is in [0, 1], so
clipping a coordinate can only move it towards ``x0``'s coordinate.
"""
from __future__ import annotations

import torch

_TINY = 1e-12


def _draw(fn, shape, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``fn(shape)`` (torch.randn or torch.rand) on ``x``'s device, or from ``generator``'s device."""
    if generator is None:
        return fn(shape, dtype=x.dtype, device=x.device)
    return fn(shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)


def per_row(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float or a (B,) tensor as a (B, 1, ..., 1) tensor that broadcasts against ``like`` (B, ...)."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    if t.shape != (like.shape[0],):
        raise ValueError(f"per-row value must be a float or a ({like.shape[0]},) tensor, got shape {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.ndim - 1)))


class AttackerStep:
    """Base class: the constraint set ``||x - x0|| <= eps`` intersected with [0, 1].

    Args:
        orig_input: x0, (B, C, H, W) in [0, 1].
        eps: radius, float or (B,).
        step_size: float or (B,).
    """

    norm: str = ""

    def __init__(self, orig_input: torch.Tensor, eps: float | torch.Tensor, step_size: float | torch.Tensor):
        self.orig_input = orig_input.detach()
        self.eps = eps
        self.step_size = step_size

    def _eps(self) -> torch.Tensor:
        return per_row(self.eps, self.orig_input)

    def _alpha(self) -> torch.Tensor:
        return per_row(self.step_size, self.orig_input)

    @staticmethod
    def clip(x: torch.Tensor) -> torch.Tensor:
        """Into the image box [0, 1]."""
        return x.clamp(0.0, 1.0)

    def project(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def random_perturb(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract


class L2Step(AttackerStep):
    """L2 ball: steps along the normalized gradient ``x + alpha * g / ||g||_2`` (per row).

    Projection rescales ``d = x - x0`` to ``d * min(1, eps / ||d||_2)``; the random start is uniform
    in the ball (Gaussian direction, radius ``eps * U^(1/d)``), then clipped to [0, 1].
    """

    norm = "l2"

    def project(self, x: torch.Tensor) -> torch.Tensor:
        d = x - self.orig_input
        n = d.flatten(1).norm(dim=1).reshape(-1, *([1] * (d.ndim - 1)))
        factor = torch.clamp(self._eps() / (n + _TINY), max=1.0)
        return self.clip(self.orig_input + d * factor)

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        gn = grad.flatten(1).norm(dim=1).reshape(-1, *([1] * (grad.ndim - 1)))
        return x + self._alpha() * grad / (gn + _TINY)

    def random_perturb(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        d = _draw(torch.randn, x.shape, x, generator)
        dim = d[0].numel()
        n = d.flatten(1).norm(dim=1).reshape(-1, *([1] * (d.ndim - 1)))
        u = _draw(torch.rand, (x.shape[0],), x, generator)
        radius = self._eps() * u.pow(1.0 / dim).reshape_as(n)
        return self.clip(x + d / (n + _TINY) * radius)


class LinfStep(AttackerStep):
    """Linf ball: signed-gradient steps ``x + alpha * sign(g)``; projection clamps ``x - x0`` to
    ``[-eps, eps]``; the random start is uniform in the cube, then clipped to [0, 1]."""

    norm = "linf"

    def project(self, x: torch.Tensor) -> torch.Tensor:
        e = self._eps()
        d = torch.maximum(torch.minimum(x - self.orig_input, e), -e)
        return self.clip(self.orig_input + d)

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return x + self._alpha() * grad.sign()

    def random_perturb(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        u = _draw(torch.rand, x.shape, x, generator)
        return self.clip(x + (2 * u - 1) * self._eps())


STEPS = {"l2": L2Step, "linf": LinfStep}


def get_step_class(norm: str) -> type[AttackerStep]:
    """``"l2"`` -> :class:`L2Step`, ``"linf"`` -> :class:`LinfStep` (case-insensitive)."""
    key = str(norm).lower().replace("_", "").replace("-", "")
    key = {"inf": "linf", "l_inf": "linf"}.get(key, key)
    if key not in STEPS:
        raise ValueError(f"attack norm {norm!r} is not known: expected one of {sorted(STEPS)} (e.g. norm='l2')")
    return STEPS[key]
