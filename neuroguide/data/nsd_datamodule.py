"""LightningDataModule: NSD images -> one region's responses (for the neural predictors)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from neuroguide.data.loaders import eval_loader, train_loader
from neuroguide.data.nsd import NSDPaths
from neuroguide.data.nsd_regions import RegionData, RegionSpec, extract_regions
from neuroguide.data.nsd_stimuli import NSDStimuli


class ImageResponseDataset(Dataset):
    """(image (3, S, S) in [0, 1], response (K,)) pairs; ``order`` maps item -> image row."""

    def __init__(self, stimuli: NSDStimuli, responses: np.ndarray):
        self.stimuli = stimuli
        self.responses = torch.from_numpy(np.array(responses, np.float32))

    def __len__(self) -> int:
        return len(self.stimuli)

    def __getitem__(self, i):
        return self.stimuli[i], self.responses[i]


class NSDDataModule(L.LightningDataModule):
    """One region of one subject: train (minus a validation tenth) / val / test = shared images.

    Training targets are the predictor's outputs (voxels, or PCA scores with ``pca``); validation and
    test targets are always the measured, repeat-averaged voxel responses.

    Args:
        nsd_root: NSD folder (real layout). subject: 1..8. region: a region config
        (name, atlas, labels, intersect). shuffle: the shuffle control (the image-response pairing of
        the training data is permuted, with ``seed``).
    """

    def __init__(self, nsd_root: str, subject: int, region: Mapping, image_size: int = 224,
                 batch_size: int = 64, num_workers: int = 0, betas_format: str = "nii.gz",
                 pca: bool = False, pca_variance: float = 0.95, cache_dir: str | None = None,
                 max_sessions: int | None = None, val_fraction: float = 0.1, shuffle: bool = False,
                 seed: int = 0, read_workers: int | str | None = "auto"):
        super().__init__()
        self.nsd_root, self.subject = nsd_root, int(subject)
        self.spec = RegionSpec.from_config(region)
        self.image_size, self.batch_size, self.num_workers = int(image_size), int(batch_size), int(num_workers)
        self.betas_format, self.pca, self.pca_variance = betas_format, bool(pca), float(pca_variance)
        self.cache_dir, self.max_sessions, self.read_workers = cache_dir, max_sessions, read_workers
        self.val_fraction, self.shuffle, self.seed = float(val_fraction), bool(shuffle), int(seed)
        self.region_data: RegionData | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.region_data is not None:
            return
        if self.nsd_root is None or not Path(self.nsd_root).expanduser().is_dir():
            raise FileNotFoundError(f"paths.nsd_root={self.nsd_root} does not exist: point it at the folder holding "
                                    "nsddata/, nsddata_betas/ and nsddata_stimuli/ (or use data=synthetic)")
        rd = extract_regions(self.nsd_root, self.subject, [self.spec], cache_dir=self.cache_dir,
                             betas_format=self.betas_format, max_sessions=self.max_sessions, pca=self.pca,
                             pca_variance=self.pca_variance, read_workers=self.read_workers)[self.spec.name]
        self.region_data = rd
        stim = NSDPaths(self.nsd_root, self.subject).stimuli
        y = rd.targets("train")  # what the predictor outputs: voxels, or PCA scores
        rng = np.random.default_rng(self.seed)
        perm = rng.permutation(len(y))
        n_val = max(1, int(round(self.val_fraction * len(y))))
        val_rows, train_rows = perm[:n_val], perm[n_val:]
        y_train = y[train_rows]
        # validation and test are scored against the measured voxels (never a PCA reconstruction)
        if self.shuffle:  # shuffle control: break the image-response pairing of the training data
            y_train = y_train[np.random.default_rng(self.seed + 1).permutation(len(y_train))]
        ids = np.asarray(rd.train_images)
        self.train_set = ImageResponseDataset(NSDStimuli(stim, ids[train_rows], self.image_size), y_train)
        self.val_set = ImageResponseDataset(NSDStimuli(stim, ids[val_rows], self.image_size),
                                            np.asarray(rd.train)[val_rows])
        self.test_set = ImageResponseDataset(NSDStimuli(stim, np.asarray(rd.test_images), self.image_size),
                                             np.asarray(rd.test))

    @property
    def n_outputs(self) -> int:
        return self.region_data.n_outputs

    def train_dataloader(self):
        ws = self.trainer.world_size if self.trainer is not None else 1
        return train_loader(self.train_set, self.batch_size, self.num_workers, self.seed, ws)

    def val_dataloader(self):
        return eval_loader(self.val_set, self.batch_size, self.num_workers)

    def test_dataloader(self):
        return eval_loader(self.test_set, self.batch_size, self.num_workers)
