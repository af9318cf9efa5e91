"""One day's stimuli of Guo et al.'s closed loop (sec. 3.1, Fig. 4 box 1): clean images, per-site attacks
from the current model of IT, and the model-free controls of the same L2 norm (Fig. 5).

Attacks: for site ``i``, clean image ``x`` and radius ``eps``, PGD from a random start in the L2 ball,
``steps`` steps of size ``step_factor * eps`` (the paper: 100 steps of eps / 3), once on
``MSE(f_i(x + d), +target)`` and once on ``MSE(f_i(x + d), -target)`` (``target = 1000``), with the one
attack engine :func:`neuroguide.attacks.pgd_attack` and
:class:`neuroguide.attacks.objectives.UnitMSEToTarget`; the direction whose image changes the model's
prediction ``f_i`` more is kept.

Controls (model-free, one per clean image and eps): Gaussian noise scaled so that the clipped image is
``eps`` away from the clean one, and linear interpolation towards another image (of another class when
the image pool has labels) by a step of L2 length ``eps``.

Shown images are 8-bit: every perturbed image is rounded to whole grey levels *inside* the ball
(:func:`quantize_within_ball`), so the image the brain sees is within ``eps`` of its clean image; the
norm actually shown is stored per image (``norm``).
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from neuroguide.attacks import pgd_attack
from neuroguide.attacks.objectives import UnitMSEToTarget
from neuroguide.data.hdf5_images import from_uint8, quantize_within_ball, row_norm, to_uint8  # noqa: F401 (stim.*)
from neuroguide.models.features import OUTPUT, activations
from neuroguide.utils.io import atomic_path

KINDS = ("clean", "attack", "gaussian", "interpolation")
META = ("kind", "site", "eps", "direction", "source", "norm")


def l2(d: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) L2 norm of each row."""
    return row_norm(d, "l2")


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, sites) float32 CPU model responses of ``x`` (N, 3, S, S) (the one activation extractor)."""
    return activations(model, x, [OUTPUT], batch_size=batch_size)[OUTPUT]


def attack_sites(model: nn.Module, x: torch.Tensor, sites: torch.Tensor, eps: torch.Tensor, *, steps: int = 100,
                 step_factor: float = 1 / 3, target: float = 1000.0, batch_size: int = 256,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Guo et al.'s attack of each row's site, both directions, the one with the larger predicted change kept.

    Args:
        model: (B, 3, S, S) in [0, 1] -> (B, sites), the current model of IT.
        x: (M, 3, S, S) 8-bit clean images in [0, 1]; sites: (M,) the site of each row; eps: (M,) radii.
    Returns:
        ``x_adv`` (M, 3, S, S) 8-bit images within eps, ``direction`` (M,) +1 (towards +target) or -1,
        ``predicted_change`` (M,) ``f_i(x_adv) - f_i(x)`` of the kept direction.
    """
    m = len(x)
    xx, idx, e = torch.cat([x, x]), torch.cat([sites, sites]).long(), torch.cat([eps, eps]).float()
    tgt = torch.cat([torch.full((m,), float(target)), torch.full((m,), -float(target))])
    dev = next(model.parameters()).device
    res = pgd_attack(model, xx.to(dev), UnitMSEToTarget(idx.to(dev), tgt.to(dev)), eps=e.to(dev), norm="l2",
                     steps=int(steps), step_size=(e * float(step_factor)).to(dev), random_start=True,
                     schedule="pgd", batch_size=int(batch_size), generator=generator)
    x_adv = quantize_within_ball(xx, res.x_adv.cpu(), e)
    rows = torch.arange(2 * m)
    change = predict(model, x_adv, batch_size)[rows, idx] - predict(model, x, batch_size)[rows % m, idx]
    up = change[:m].abs() >= change[m:].abs()
    return {"x_adv": torch.where(up.view(-1, 1, 1, 1), x_adv[:m], x_adv[m:]),
            "direction": torch.where(up, 1, -1), "predicted_change": torch.where(up, change[:m], change[m:])}


def gaussian_control(x: torch.Tensor, eps: torch.Tensor, generator: torch.Generator | None = None,
                     iters: int = 40) -> torch.Tensor:
    """(M, 3, S, S) 8-bit images: ``clip(x + s g)`` with ``g ~ N(0, I)`` and ``s`` chosen (bisection) so the
    clipped step has L2 norm ``eps`` (M,), then rounded inside the ball."""
    g = torch.randn(x.shape, generator=generator)

    def norm(s):
        return l2((x + s.view(-1, 1, 1, 1) * g).clamp(0, 1) - x)

    lo, hi = torch.zeros(len(x)), eps / l2(g)
    for _ in range(30):  # grow the bracket until the clipped step reaches eps
        short = norm(hi) < eps
        if not short.any():
            break
        hi = torch.where(short, 2 * hi, hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        below = norm(mid) < eps
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return quantize_within_ball(x, (x + lo.view(-1, 1, 1, 1) * g).clamp(0, 1), eps)


def interpolation_control(x: torch.Tensor, other: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """(M, 3, S, S) 8-bit images ``x + t (other - x)``, ``t = min(1, eps / ||other - x||)`` (a step of L2 length
    eps towards ``other``, in the box since it is a convex combination), rounded inside the ball."""
    d = other - x
    t = torch.clamp(eps / l2(d).clamp_min(1e-12), max=1.0)
    return quantize_within_ball(x, x + t.view(-1, 1, 1, 1) * d, eps)


# ---------------------------------------------------------------------- the stimuli file
def write_stimuli(path: str | os.PathLike, images: np.ndarray, image_ids: list[str], meta: dict[str, np.ndarray],
                  predicted: np.ndarray, site_ids: list[str], attrs: dict) -> Path:
    """Write a day's stimuli (atomically).

    Datasets: ``images`` (M, S, S, 3) uint8, ``image_ids`` (M,), ``site_ids`` (sites,), the per-image metadata
    ``kind`` (clean / attack / gaussian / interpolation), ``site`` (index of the attacked site, -1 for none),
    ``eps`` (0 for clean), ``direction`` (+1 / -1 for attacks, 0 otherwise), ``source`` (image id of the
    clean image it was made from; its own id for a clean image), ``norm`` (L2 norm actually shown), and
    ``predicted`` (M, sites) the proposing model's responses (whose signs the lower bound uses).
    """
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images", data=images)
            f.create_dataset("image_ids", data=np.array(image_ids, dtype="S"))
            f.create_dataset("site_ids", data=np.array(site_ids, dtype="S"))
            for k in META:
                v = np.asarray(meta[k])
                f.create_dataset(k, data=v.astype("S") if v.dtype.kind in "UO" else v)
            f.create_dataset("predicted", data=np.asarray(predicted, np.float32))
            f.attrs.update(attrs)
    return Path(path)


def read_stimuli(path: str | os.PathLike) -> dict:
    """A stimuli file as a dict of numpy arrays (strings decoded) plus ``attrs``."""
    out = {}
    with h5py.File(path, "r") as f:
        for k in f:
            v = f[k][()]
            out[k] = np.array([s.decode() for s in v]) if v.dtype.kind == "S" else v
        out["attrs"] = dict(f.attrs)
    return out
