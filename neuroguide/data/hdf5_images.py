"""Images read lazily from an HDF5 dataset of (N, H, W, 3) uint8, one at a time (NSD's ``imgBrick``, the
IT recordings' ``images``): the file is never loaded whole."""
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


class HDF5Images(Dataset):
    """Item ``i``: row ``rows[i]`` of dataset ``key`` of the file as (3, S, S) float in [0, 1], resized
    (antialiased bilinear) to ``image_size`` when it differs.

    The HDF5 file is opened on first access in each worker (handles are not pickled).
    """

    def __init__(self, path: str | os.PathLike, key: str, rows: np.ndarray, image_size: int):
        self.path, self.key = Path(path), key
        self.rows, self.image_size = np.asarray(rows, np.int64), int(image_size)
        self._f = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._f is None:
            self._f = h5py.File(self.path, "r")
        img = torch.from_numpy(self._f[self.key][int(self.rows[i])]).permute(2, 0, 1).float() / 255.0
        if tuple(img.shape[-2:]) != (self.image_size, self.image_size):
            img = F.interpolate(img[None], size=(self.image_size, self.image_size), mode="bilinear",
                                antialias=True, align_corners=False)[0].clamp_(0, 1)
        return img

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_f"] = None
        return d
