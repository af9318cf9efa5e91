"""DataLoaders whose batches depend only on (seed, epoch): order and pixels.

A run resumed from ``last.ckpt`` then sees the same batches as an uninterrupted run. The training
sampler (:class:`EpochSampler`, a seeded ``DistributedSampler``; under DDP one replica per rank,
which Lightning keeps as it is) shuffles by (seed, epoch) and hands the dataset ``(index, epoch)``
keys; :class:`SeededSamples` draws each sample's random augmentation (crops, flips) with the
generators seeded by (seed, epoch, index), so the pixels do not depend on the history of the
global generators, on ``num_workers`` or on persistent workers either.
"""
from __future__ import annotations

from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from neuroguide.utils.seeding import derive_seed, seeded_cpu_rngs


class EpochSampler(DistributedSampler):
    """A seeded ``DistributedSampler`` yielding ``(index, epoch)``: the epoch travels with the index
    to the workers (persistent workers keep their own copy of the dataset)."""

    def __iter__(self):
        epoch = int(self.epoch)
        return ((int(i), epoch) for i in super().__iter__())


class SeededSamples(Dataset):
    """``dataset`` indexed by ``(index, epoch)``: the sample is made with Python's, numpy's and torch's
    CPU generators seeded by (seed, epoch, index) (restored after); a plain index reads the sample
    with the global generators as they are. Other attributes are those of ``dataset``."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, epoch = key
        with seeded_cpu_rngs(derive_seed(self.seed, epoch, index)):
            return self.dataset[index]

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("dataset", "seed"):  # no dunders (__getitems__), no recursion in pickling
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _rank() -> int | None:
    """This process's rank in the process group; None when there is none."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def train_loader(ds: Dataset, batch_size: int, num_workers: int = 0, seed: int = 0, world_size: int = 1,
                 **kw) -> DataLoader:
    rank = _rank() if world_size > 1 else 0
    if rank is None:  # several processes but no process group yet: Lightning installs its own sampler
        return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                          persistent_workers=num_workers > 0, **kw)
    sampler = EpochSampler(ds, num_replicas=max(1, world_size), rank=rank, shuffle=True, seed=seed, drop_last=False)
    return DataLoader(SeededSamples(ds, seed), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0, **kw)


def eval_loader(ds: Dataset, batch_size: int, num_workers: int = 0, **kw) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      persistent_workers=num_workers > 0, **kw)
