"""DataLoaders whose shuffling depends only on (seed, epoch).

A run resumed from ``last.ckpt`` then sees the same batches as an uninterrupted run. In one
process the sampler is a seeded ``DistributedSampler`` with one replica (Lightning calls its
``set_epoch``); under DDP Lightning installs its own distributed sampler (seeded by
``PL_GLOBAL_SEED``).
"""
from __future__ import annotations

from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


def train_loader(ds: Dataset, batch_size: int, num_workers: int = 0, seed: int = 0, world_size: int = 1,
                 **kw) -> DataLoader:
    sampler = None
    if world_size <= 1:
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=False)
    return DataLoader(ds, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0, **kw)


def eval_loader(ds: Dataset, batch_size: int, num_workers: int = 0, **kw) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      persistent_workers=num_workers > 0, **kw)
