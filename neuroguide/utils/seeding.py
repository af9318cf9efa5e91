"""Random streams that depend on where a run is, not on its history.

A resumed run must draw the same random numbers as an uninterrupted one. Rather than carrying
the generators' states through checkpoints, every stream of training is seeded from a position:
the global generators before each training batch from (seed, epoch, batch index, rank)
(:class:`neuroguide.callbacks.ExactResume`: PGD random starts, dropout, anything a training step draws), and each training sample's augmentation from (seed, epoch, index)
(:class:`neuroguide.data.loaders.SeededSamples`: the same crops and flips with any number of
data-loader workers, persistent or not, and on any number of GPUs).
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (e.g. seed, epoch, index), well mixed (numpy's SeedSequence)."""
    words = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def check_seed(seed: object, key: str = "seed") -> int:
    """``seed`` (a config value) if it is an integer, else a ValueError naming ``key`` (``seed=abc``, ``seed=1.5`` and
    ``seed=true`` once failed later as ``invalid literal for int()`` or ran as seed 1)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{key} must be an integer (it seeds every random generator of the run), e.g. {key}=0; got "
                         f"{seed!r}. Fix: {key}=<integer>")
    return seed


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and every GPU) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def seeded_cpu_rngs(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's CPU generators seeded with ``seed`` inside, restored after (GPU
    generators untouched): for drawing a sample's augmentation without disturbing anything else."""
    py, nps, th = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(nps)
        torch.default_generator.set_state(th)
