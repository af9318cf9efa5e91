"""Images read lazily from an HDF5 dataset of (N, H, W, 3) uint8, one at a time (NSD's ``imgBrick``, the
IT recordings' ``images``): the file is never loaded whole; and the 8-bit image layout shared by every file of
images the project writes for a display (the closed loop's stimuli, criterion C's lab stimuli): :func:`to_uint8` /
:func:`from_uint8`, and :func:`quantize_within_ball`, which rounds a perturbed image to whole grey levels without
leaving its budget."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) in [0, 1] -> (B, S, S, 3) uint8, the stored layout (rounded to whole grey levels)."""
    return (x.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def as_8bit(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> the same images rounded to whole grey levels (float32, CPU): what an 8-bit
    display shows, ``from_uint8(to_uint8(x))``."""
    return from_uint8(to_uint8(x))


def row_norm(d: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """(B, ...) -> (B,) the ``norm`` ("l2" or "linf") of each row."""
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm={norm!r}: expected 'l2' or 'linf'")
    return d.flatten(1).norm(dim=1) if norm == "l2" else d.flatten(1).abs().amax(dim=1)


def quantize_within_ball(x0: torch.Tensor, x: torch.Tensor, eps, iters: int = 20, norm: str = "l2") -> torch.Tensor:
    """``x0 + round(255 s (x - x0)) / 255`` with the largest ``s`` in [0, 1] whose rounded step has ``norm`` (l2 or
    linf) <= ``eps`` (a float or (B,); bisection per row, ``iters`` halvings, s = 1 where the whole step fits).
    ``x0`` (B, 3, S, S) must be 8-bit images (multiples of 1/255, e.g. :func:`as_8bit`) and ``x`` in [0, 1]; the
    result is exactly 8-bit (``from_uint8(to_uint8(result))`` is ``result``), in [0, 1] and within ``eps`` of ``x0``
    (norms in float64, from the whole grey levels stored; a step shorter than its rounding is lost: s = 0 gives
    ``x0``)."""
    x0 = x0.detach().cpu().float()
    eps = torch.as_tensor(eps, dtype=torch.float64).expand(len(x))
    d = x.detach().cpu().double() - x0.double()  # float64 norms: the bound holds for the stored grey levels

    def levels(s: torch.Tensor) -> torch.Tensor:  # the step in whole grey levels
        return torch.round(255 * s.view(-1, *([1] * (d.ndim - 1))) * d)

    lo, hi = torch.zeros(len(d), dtype=torch.float64), torch.ones(len(d), dtype=torch.float64)
    whole = row_norm(levels(hi), norm) / 255 <= eps
    for _ in range(iters):
        mid = (lo + hi) / 2
        fits = row_norm(levels(mid), norm) / 255 <= eps
        lo, hi = torch.where(fits, mid, lo), torch.where(fits, hi, mid)
    s = torch.where(whole, hi, lo)
    # grey level / 255 in float32, as from_uint8 gives it: to_uint8 and back is the identity
    return ((255 * x0.double()).round() + levels(s)).clamp(0, 255).float() / 255


class HDF5Images(Dataset):
    """Item ``i``: row ``rows[i]`` of dataset ``key`` of the file as (3, S, S) float in [0, 1], resized
    (antialiased bilinear) to ``image_size`` when it differs.

    The HDF5 file and its dataset are opened on first access in each worker (handles are not pickled) and kept:
    an item costs one read of its row (looking the dataset up by name per item cost as much as the read).
    """

    def __init__(self, path: str | os.PathLike, key: str, rows: np.ndarray, image_size: int):
        self.path, self.key = Path(path), key
        self.rows, self.image_size = np.asarray(rows, np.int64), int(image_size)
        self._f = self._d = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._d is None:
            self._f = h5py.File(self.path, "r")
            self._d = self._f[self.key]
        img = torch.from_numpy(self._d[int(self.rows[i])]).permute(2, 0, 1).float().div_(255.0)
        if tuple(img.shape[-2:]) != (self.image_size, self.image_size):
            img = F.interpolate(img[None], size=(self.image_size, self.image_size), mode="bilinear",
                                antialias=True, align_corners=False)[0].clamp_(0, 1)
        return img

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_f"] = d["_d"] = None
        return d
