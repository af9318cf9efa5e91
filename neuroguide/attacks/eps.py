"""Attack radii as users write them: ``1.0`` (L2, [0, 1] pixel units) or ``8/255`` (Linf, k/255).

Hydra and YAML read ``8/255`` as the string ``"8/255"`` (``eval.robustness.eps_linf=[8/255,16/255]``,
``at.eps=8/255``); :func:`parse_eps` turns it (or any number, or ``"0.5"``) into a float. Linf radii that
lie within :data:`SNAP_TOL` of a whole k/255 are snapped to exactly ``k / 255`` (:func:`snap_linf`), so a
float typed to a few digits (``0.0313725``) and ``8/255`` give the same attack, the same metric key
(``linf_8_255``) and the same label.
"""
from __future__ import annotations

import math
import re

LINF_DENOM = 255
# snap when |eps * 255 - k| <= SNAP_TOL: a float rounded to 5 significant digits (8/255 ~ 0.031373, error
# 3e-7, i.e. 8e-5 in k) snaps; k + 0.5 never does
SNAP_TOL = 1e-3
_FRACTION = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*/\s*(\d+(?:\.\d*)?|\.\d+)\s*$")


def parse_eps(value, name: str = "eps") -> float:
    """A radius as a float: a number, or a string ``"a/b"`` (``"8/255"``) or ``"0.5"``. A ValueError
    naming ``name`` otherwise (it does not check the sign: callers say what range they accept)."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a number or a fraction such as 8/255, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = _FRACTION.match(value)
        if m:
            num, den = float(m.group(1)), float(m.group(2))
            if den == 0:
                raise ValueError(f"{name}: {value!r} divides by zero; write Linf radii as k/255, e.g. 8/255")
            return num / den
        try:
            return float(value)
        except ValueError:
            pass
    try:  # numpy scalars, 0-d tensors
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number (L2: [0, 1] pixel units, e.g. 1.0) or a fraction (Linf: k/255, "
                         f"e.g. 8/255), got {value!r}") from None


def snap_linf(eps: float, tol: float = SNAP_TOL) -> float:
    """``k / 255`` when ``eps * 255`` is within ``tol`` of a whole ``k >= 1``; else ``eps`` unchanged."""
    e = float(eps)
    if not math.isfinite(e):
        return e
    k = round(e * LINF_DENOM)
    if k >= 1 and abs(e * LINF_DENOM - k) <= tol:
        return k / LINF_DENOM
    return e


def linf_k(eps: float, tol: float = SNAP_TOL) -> int | None:
    """The whole k of ``eps = k/255`` (within ``tol``), or None."""
    e = float(eps)
    if not math.isfinite(e):
        return None
    k = round(e * LINF_DENOM)
    return int(k) if k >= 1 and abs(e * LINF_DENOM - k) <= tol else None


def parse_eps_for(value, norm: str, name: str = "eps") -> float:
    """:func:`parse_eps`, then snapped to k/255 for Linf (``norm`` ``linf`` or ``fgsm``)."""
    e = parse_eps(value, name)
    return snap_linf(e) if str(norm).lower() in ("linf", "fgsm", "inf") else e


__all__ = ["parse_eps", "parse_eps_for", "snap_linf", "linf_k", "SNAP_TOL", "LINF_DENOM"]
