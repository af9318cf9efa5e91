"""How a classification dataset is split and subsampled: a stratified validation split held out of the
training images, and a class-balanced head of a sample list."""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np


def stratified_split(targets: Sequence[int], val_fraction: float, seed: int = 0,
                     class_keys: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows), sorted: ``round(val_fraction * n_c)`` rows of every class held out
    (at least 1 when ``val_fraction > 0`` and the class has 2 rows or more; never all of them).

    The held-out rows of class ``c`` are the first of a permutation of its rows (in their listed
    order) seeded by ``(seed, crc32(class_keys[c]))``, so they depend on the class (its name when
    ``class_keys`` is given) and ``seed`` only, not on the other classes.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if not 0 <= float(val_fraction) < 1:
        raise ValueError(f"val_fraction must lie in [0, 1) (the fraction of each class's training images held out "
                         f"for validation; 0 = validate on the test split); got {val_fraction}")
    val = []
    for c in np.unique(targets):
        rows = np.flatnonzero(targets == c)
        key = class_keys[int(c)] if class_keys is not None else str(int(c))
        n_val = int(round(float(val_fraction) * len(rows)))
        if val_fraction > 0 and len(rows) >= 2:
            n_val = min(max(n_val, 1), len(rows) - 1)
        else:
            n_val = 0
        perm = np.random.default_rng([int(seed), zlib.crc32(key.encode())]).permutation(len(rows))
        val.append(rows[perm[:n_val]])
    val_rows = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train_rows = np.setdiff1d(np.arange(len(targets)), val_rows)
    return train_rows, val_rows


def balanced_head(samples: list[tuple[str, int]], limit: int) -> list[tuple[str, int]]:
    """At most ``limit`` samples, taking the first sample of every class, then the second, ..."""
    rank: dict[int, int] = {}
    keyed = []
    for i, (_path, t) in enumerate(samples):
        r = rank.get(t, 0)
        rank[t] = r + 1
        keyed.append((r, t, i))
    keep = sorted(i for _, _, i in sorted(keyed)[:limit])
    return [samples[i] for i in keep]
