"""Lazy reader of NSD's ``imgBrick`` (``nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5``, (73000, 425, 425, 3)
uint8, about 26 GB): images are read one at a time, never the whole file."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from neuroguide.utils.io import require


class NSDStimuli(torch.utils.data.Dataset):
    """Lazy reader of ``imgBrick``: item ``i`` is image ``ids[i]`` as (3, S, S) float in [0, 1].

    The HDF5 file is opened on first access in each worker (handles are not pickled); images are
    resized (antialiased bilinear) to ``image_size``.
    """

    def __init__(self, path: str | Path, ids: np.ndarray, image_size: int):
        self.path = require(Path(path), "NSD stimuli file nsd_stimuli.hdf5")
        self.ids = np.asarray(ids, np.int64)
        self.image_size = int(image_size)
        self._f = None
        with h5py.File(self.path, "r") as f:
            if "imgBrick" not in f:
                raise KeyError(f"{self.path} has no dataset 'imgBrick'")
            n = f["imgBrick"].shape[0]
        if len(self.ids) and self.ids.max() >= n:
            raise ValueError(f"image id {self.ids.max()} out of range for {self.path} ({n} images)")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._f is None:
            self._f = h5py.File(self.path, "r")
        img = torch.from_numpy(self._f["imgBrick"][int(self.ids[i])]).permute(2, 0, 1).float() / 255.0
        if img.shape[-1] != self.image_size:
            img = F.interpolate(img[None], size=(self.image_size, self.image_size), mode="bilinear",
                                antialias=True, align_corners=False)[0].clamp_(0, 1)
        return img

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_f"] = None
        return d
