"""Steps of projected gradient ascent in [0, 1] pixel space, one class per threat model.

In the manner of MadryLab's ``robustness.attack_steps``: a step object holds the clean input
``x0`` (B, C, H, W), the radius ``eps`` and the step size, and knows how to

- ``random_perturb(x)``: draw a random start inside the ball (and inside [0, 1]),
- ``step(x, g)``: move along the ascent direction of the gradient ``g``,
- ``project(x)``: return to ``{x' : ||x' - x0|| <= eps} ∩ [0, 1]^d``.

``eps`` and ``step_size`` may be Python floats or (B,) tensors (one value per row), so rows with
different radii and annealed step sizes share one batch. Both are plain attributes: the Guo et al.
schedule changes them between iterations.

Both projections are exact Euclidean projections onto ball ∩ box. For Linf the intersection of the
two boxes is a box, so clamping to ``[-eps, eps]`` then clipping to [0, 1] is exact. For L2 the
radial rescaling followed by clipping is not (it lands strictly inside the ball when a coordinate
meets the box, and PGD then stalls short of the optimum when pixels are at 0 or 1); the projection
solves the KKT conditions instead (:func:`project_l2_box`).
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


L2_BOX_MAX_ITER = 30
L2_BOX_RTOL = 1e-5


def scale_in_box(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, eps: torch.Tensor, t0: torch.Tensor,
                 t_max: float = 1.0) -> torch.Tensor:
    """``d = clip(t v, lo, hi)`` per row with the scale ``t`` in ``[t0, t_max]`` that makes ``||d||_2 = eps``
    (``lo <= 0 <= hi``; needs ``||clip(t0 v)|| <= eps``). Where even ``t_max`` falls short, ``t = t_max``
    (``||d|| < eps``: the caller can see it).

    As a function of ``s = t^2``, ``phi(s) = ||clip(sqrt(s) v)||^2`` is concave, increasing and piecewise
    linear (its slope ``U`` is the squared norm of ``v`` over the coordinates not at a bound), so Newton's
    method from ``t0`` climbs monotonically to the root, never above it, and is exact once the set of
    coordinates at a bound is right (one to three iterations in practice). The loop stops when every row
    has ``||d||^2`` within ``L2_BOX_RTOL`` of ``eps^2`` (or ``t = t_max``), at most ``L2_BOX_MAX_ITER``
    iterations. All rows at once: v, lo, hi (B, D); eps, t0 (B,).
    """
    e2 = (eps * eps).to(v.dtype)
    t = t0.to(v.dtype)
    for _ in range(L2_BOX_MAX_ITER):
        tv = t[:, None] * v
        d = torch.clamp(tv, lo, hi)
        f = _sqnorm(d)
        done = (t >= t_max) | (e2 - f <= L2_BOX_RTOL * e2)
        if bool(done.all()):
            return d
        u = _sqnorm(torch.where(d == tv, v, torch.zeros_like(v)))  # ||v||^2 over the free coordinates
        sat = f - t * t * u  # ||d||^2 over the coordinates at a bound
        t_new = ((e2 - sat).clamp_min(0) / u.clamp_min(_TINY)).sqrt().clamp(max=t_max)
        t = torch.where(done, t, torch.maximum(t, t_new))  # monotone (guards against rounding)
    return torch.clamp(t[:, None] * v, lo, hi)


def project_l2_box(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean projection of each row of ``v`` onto ``{||d||_2 <= eps_b} ∩ {lo <= d <= hi}``
    (``lo = -x0``, ``hi = 1 - x0`` for the pixel box; ``lo <= 0 <= hi``).

    KKT: ``d = clip(t v, lo, hi)`` with ``t = 1 / (1 + mu)`` in (0, 1], ``mu >= 0`` and ``||d|| = eps``
    when ``mu > 0``; ``t = 1`` when the clipped ``v`` is already inside the ball. ``t`` is found by
    :func:`scale_in_box` from the lower bound ``eps / ||v||`` (``||clip(t v)|| <= t ||v||``), which is
    the root itself where the box does not bind (radial rescaling).

    Radial rescaling followed by clipping (Madry et al.'s projection) lands strictly inside the ball
    when a coordinate meets the box, so PGD with it stalls short of the box-constrained optimum.

    Args:
        v: (B, ...) displacement from the clean image.
        lo, hi: (B, ...) bounds of the displacement.
        eps: (B,) radii.
    """
    shape = v.shape
    v, lo, hi = v.flatten(1), lo.flatten(1), hi.flatten(1)
    eps = eps.to(v.dtype)
    t0 = (eps / torch.linalg.vector_norm(v, dim=1).clamp_min(_TINY)).clamp(max=1.0)
    d = scale_in_box(v, lo, hi, eps, t0, t_max=1.0)
    # rounding only: shrink into the ball (a factor <= 1 keeps d in the box, which contains 0)
    d = d.mul_(torch.clamp(eps / torch.linalg.vector_norm(d, dim=1).clamp_min(_TINY), max=1.0)[:, None])
    return d.reshape(shape)


def _sqnorm(v: torch.Tensor) -> torch.Tensor:
    """(B,) squared L2 norm of each row of (B, D), without a squared temporary."""
    return torch.linalg.vector_norm(v, dim=1).square()


def free_gradient(grad: torch.Tensor, unmoved: torch.Tensor, outward: torch.Tensor) -> torch.Tensor:
    """``grad`` without its components at pixels that sit at 0 or 1 in the clean image, have not moved
    (``unmoved``) and whose gradient points out of [0, 1] (``grad * outward > 0``, ``outward`` = -1 at
    0, +1 at 1, 0 inside): no feasible step moves them, so a normalized step spends its whole length on
    coordinates that can move. A pixel that the perturbation itself pushed to a bound keeps its
    gradient, so the box-constrained optimum stays a fixed point of step + projection."""
    blocked = unmoved & (grad * outward > 0)
    return torch.where(blocked, torch.zeros_like(grad), grad)


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
    """L2 ball: steps along the normalized gradient ``x + alpha * g / ||g||_2`` (per row), with ``g``
    restricted to the coordinates that can move (:func:`free_gradient`: pixels at 0 or 1 in the
    clean image, unmoved, whose gradient points out of the box are left out).

    Projection is the exact Euclidean projection of ``v = x - x0`` onto ``{||d||_2 <= eps} ∩
    {0 <= x0 + d <= 1}`` (see :func:`project_l2_box`); the random start is uniform in the ball
    (Gaussian direction, radius ``eps * U^(1/d)``), then clipped to [0, 1].
    """

    norm = "l2"

    def _box(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bounds ``-x0``, ``1 - x0`` of the displacement and the outward direction at clean pixels at 0
        or 1 (computed once per step object)."""
        if getattr(self, "_box_cache", None) is None:
            x0 = self.orig_input
            outward = (x0 >= 1).to(x0.dtype) - (x0 <= 0).to(x0.dtype)
            self._box_cache = (-x0, 1 - x0, outward)
        return self._box_cache

    def project(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi, _ = self._box()
        d = project_l2_box(x - self.orig_input, lo, hi, self._eps().flatten())
        return (self.orig_input + d).clamp_(0.0, 1.0)  # rounding only: x0 + d is in the box

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        grad = free_gradient(grad, x == self.orig_input, self._box()[2])
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
