"""Attack radii as users write them: ``1.0`` (L2, [0, 1] pixel units) or ``8/255`` (Linf, k/255).

Hydra and YAML read ``8/255`` as the string ``"8/255"`` (``eval.robustness.eps_linf=[8/255,16/255]``,
``at.eps=8/255``); :func:`parse_eps` turns it (or any number, or ``"0.5"``) into a float. Linf radii that
lie within :data:`SNAP_TOL` of a whole k/255 are snapped to exactly ``k / 255`` (:func:`snap_linf`), so a
float typed to a few digits (``0.0313725``) and ``8/255`` give the same attack, the same metric key
(``linf_8_255``) and the same label.

:func:`check_eps_units` is the one check of an eps's units, called wherever a user's eps comes in (``at.eps``,
every eps key of ``conf/eval/*.yaml``, ``loop.eps``): a Linf eps of 1 or more is refused (images are in [0, 1],
so ``8`` is not ``8/255``), and a k/255 value given as an L2 eps is warned about (L2 budgets are usually 0.25-3).
"""
from __future__ import annotations

import logging
import math
import re

LINF_DENOM = 255
LINF_NORMS = ("linf", "fgsm", "inf")
# an L2 eps equal to k/255 with 1 <= k <= L2_K255_MAX looks like a Linf budget typed under the L2 norm (8/255 as
# an L2 eps is 0.031, a hundredth of a usual L2 budget); 0.25 * 255 = 63.75 and 0.1 * 255 = 25.5 are no k/255
L2_K255_MAX = 32
log = logging.getLogger("neuroguide")
_WARNED: set = set()  # (name, eps) already warned about in this process: the config check and the run say it once
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


def is_linf(norm) -> bool:
    """True for the Linf threat models (``linf``, ``fgsm``, ``inf``, ``l_inf``; any case)."""
    return str(norm).lower().replace("_", "").replace("-", "") in LINF_NORMS


def parse_eps_for(value, norm: str, name: str = "eps") -> float:
    """:func:`parse_eps`, then snapped to k/255 for Linf (``norm`` ``linf`` or ``fgsm``)."""
    e = parse_eps(value, name)
    return snap_linf(e) if is_linf(norm) else e


def linf_fix(name: str) -> str:
    """How to make the eps of key ``name`` a Linf eps: ``eval.robustness.eps_l2`` -> put it in
    ``eval.robustness.eps_linf``; ``eval.selection.brain_eps`` -> ``eval.selection.brain_norm=linf``; otherwise the
    sibling ``norm`` key (``at.eps`` -> ``at.norm=linf``)."""
    parent, _, leaf = str(name).rpartition(".")
    prefix = f"{parent}." if parent else ""
    if leaf.endswith("eps_l2"):
        return f"for a Linf budget give it in {prefix}{leaf[:-2]}linf"
    if leaf.endswith("_eps"):
        return f"for a Linf budget set {prefix}{leaf[:-3]}norm=linf"
    return f"for a Linf budget set {prefix}norm=linf"


def check_eps_units(eps: float, norm: str, name: str = "eps", given=None, *, warn: bool = True,
                    fix: str | None = None, in_list: bool = False) -> float:
    """``eps`` (a parsed float) unchanged after checking its units against ``norm``; ``name`` is the config key
    (``at.eps``, ``eval.robustness.eps_linf``) and ``given`` what the user wrote (for the messages).

    - Linf (``linf``, ``fgsm``): images are in [0, 1], so an eps >= 1 allows every image (``at.eps=8`` would
      train at the whole pixel range): a ValueError naming ``name`` and the fix ``8/255``.
    - L2: an eps equal to k/255 (1 <= k <= :data:`L2_K255_MAX`, e.g. ``8/255`` = 0.031) is most likely a Linf
      budget under the default L2 norm: a warning naming ``name`` (once per key and value in a process), unless
      ``warn`` is false; ``fix`` says how to make it Linf (default :func:`linf_fix` of ``name``). It is not
      refused: a tiny L2 budget can be meant.

    ``in_list``: ``name`` holds a list of eps (the fix is then written ``name=[8/255]``).
    """
    e = float(eps)
    shown = eps if given is None else given
    what = f"{name} holds {shown}" if in_list else f"{name}={shown}"
    if is_linf(norm):
        if math.isfinite(e) and e >= 1:
            k = int(round(e)) if e == round(e) and 1 <= e < LINF_DENOM else 8
            frac = f"[{k}/255]" if in_list else f"{k}/255"
            raise ValueError(f"{what}: images are in [0, 1], so a {norm} eps of {e:g} is the whole pixel range (every "
                             f"image is within it). Linf budgets are written k/255: did you mean {name}={frac}? "
                             f"(8/255 = {8 / LINF_DENOM:.4f})")
        return e
    k = linf_k(e)
    if warn and k is not None and k <= L2_K255_MAX and (name, e) not in _WARNED:
        _WARNED.add((name, e))
        log.warning("%s: that is %d/255 = %.4f as an L2 eps (norm %s), but k/255 is how Linf budgets are written and "
                    "L2 budgets are usually 0.25-3 ([0, 1] pixel units, at 32-224 px). Fix: %s; for an L2 budget give "
                    "the radius, e.g. %s=%s", what, k, e, norm, fix or linf_fix(name), name,
                    "[0.5]" if in_list else "0.5")
    return e


__all__ = ["parse_eps", "parse_eps_for", "check_eps_units", "linf_fix", "is_linf", "snap_linf", "linf_k", "SNAP_TOL",
           "LINF_DENOM", "L2_K255_MAX"]
