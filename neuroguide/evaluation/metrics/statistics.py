"""The one sample standard deviation and standard error of the evaluation package.

Convention (every analysis that reports a spread or an error bar uses these): the sample sd with ``N - 1`` in the
denominator (ddof 1, Bessel's correction; the square root is still biased low for small N), over the *finite*
values only (NaN / inf are left out, as missing), and **NaN when fewer than 2 finite values remain**: the spread of
one value is undefined, not 0. The standard error of the mean is ``sd / sqrt(n)``, ``n`` the number of finite
values, NaN under the same rule. Computed in float64.
"""
from __future__ import annotations

import math

import torch


def _finite(t, dim: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    t = torch.as_tensor(t).detach().cpu().double()
    if dim is None:
        t = t.flatten()
        dim = 0
    return t, torch.isfinite(t), dim


def _out(value: torch.Tensor, dim: int | None, like) -> float | torch.Tensor:
    if dim is None:
        return float(value)
    like = torch.as_tensor(like)
    return value.to(like.dtype) if like.is_floating_point() else value


def n_finite(t, dim: int | None = None) -> int | torch.Tensor:
    """The number of finite values of ``t`` (all of them, or along ``dim``: a tensor of the other dims' shape)."""
    _, fin, d = _finite(t, dim)
    n = fin.sum(d)
    return int(n) if dim is None else n


def sd(t, dim: int | None = None) -> float | torch.Tensor:
    """Sample standard deviation (ddof 1) of the finite values of ``t`` (a tensor, array or sequence).

    ``dim=None``: over all values, a float. ``dim=k``: along that axis, a tensor of the remaining shape (in ``t``'s
    floating dtype, float64 otherwise). NaN where fewer than 2 values are finite (see the module docstring)."""
    x, fin, d = _finite(t, dim)
    n = fin.sum(d, keepdim=True)
    mean = torch.where(fin, x, 0.0).sum(d, keepdim=True) / n.clamp_min(1)
    var = torch.where(fin, x - mean, 0.0).pow(2).sum(d, keepdim=True) / (n - 1).clamp_min(1)
    out = torch.where(n > 1, var.sqrt(), torch.full_like(var, math.nan)).squeeze(d)
    return _out(out, dim, t)


def standard_error(t, dim: int | None = None) -> float | torch.Tensor:
    """Standard error of the mean of the finite values of ``t``: ``sd(t) / sqrt(n)``, ``n`` the number of finite
    values (per slice with ``dim``, as :func:`sd`); NaN where fewer than 2 values are finite."""
    s = sd(t, dim)
    n = n_finite(t, dim)
    if dim is None:
        return s / math.sqrt(n) if n > 1 else math.nan
    return s / n.to(s.dtype).clamp_min(1).sqrt()
