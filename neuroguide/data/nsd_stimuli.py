"""Lazy reader of NSD's ``imgBrick`` (``nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5``, (73000, 425, 425, 3)
uint8, about 26 GB): images are read one at a time, never the whole file."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from neuroguide.data.hdf5_images import HDF5Images
from neuroguide.utils.io import require


class NSDStimuli(HDF5Images):
    """Lazy reader of ``imgBrick``: item ``i`` is image ``ids[i]`` as (3, S, S) float in [0, 1], resized
    (antialiased bilinear) to ``image_size``."""

    def __init__(self, path: str | Path, ids: np.ndarray, image_size: int):
        path = require(Path(path), "NSD stimuli file nsd_stimuli.hdf5")
        super().__init__(path, "imgBrick", ids, image_size)
        with h5py.File(self.path, "r") as f:
            if "imgBrick" not in f:
                raise KeyError(f"{self.path} has no dataset 'imgBrick'")
            n = f["imgBrick"].shape[0]
        if len(self.rows) and self.rows.max() >= n:
            raise ValueError(f"image id {self.rows.max()} out of range for {self.path} ({n} images)")

    @property
    def ids(self) -> np.ndarray:
        """(N,) 0-based 73k ids of the images."""
        return self.rows
