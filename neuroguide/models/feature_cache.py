"""The feature cache of encoding models: a backbone's pooled layer features, computed once per (backbone,
weights fingerprint, layer, pooling, image size, image ids) and stored as memory-mappable ``.npy`` arrays.

A folder per layer, ``<cache_dir>/features/<backbone>/<layer>_<key>/`` with ``features.npy`` (N, D) float32,
``image_ids.npy`` (N,) (the rows' image ids, checked on every read) and ``meta.json``; written under a
temporary name and renamed (:func:`neuroguide.utils.io.atomic_dir`), so a crash or a concurrent writer never
leaves half a cache. Features come from the project's one extractor,
:func:`neuroguide.models.features.activations` (with ``pool``), so they equal what the exported model's
pooling gives.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from neuroguide.models.features import activations
from neuroguide.utils.io import atomic_dir, file_fingerprint, hash_inputs, write_json

log = logging.getLogger("neuroguide")


def weights_fingerprint(weights: Path | None, network: nn.Module) -> dict:
    """The identity of a backbone's weights: the file's fingerprint, or (random init) a hash of the tensors."""
    if weights is not None:
        return file_fingerprint(weights)
    h = hashlib.sha256()
    for k, v in sorted(network.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return {"random_init_sha256": h.hexdigest()[:16]}


def ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(ids, np.int64)).tobytes()).hexdigest()[:16]


def feature_folder(cache_dir: str | Path, backbone: str, layer: str, identity: Mapping, pool: int | None,
                   image_size: int, ids: np.ndarray) -> Path:
    key = hash_inputs(dict(identity), layer, pool, int(image_size), ids_digest(ids), {"v": 1})
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in layer)
    return Path(cache_dir) / "features" / backbone / f"{safe}_{key}"


def read_features(folder: Path, ids: np.ndarray) -> np.ndarray:
    """The cached (N, D) features of ``folder`` as a read-only memory map, after checking that its rows are
    the images ``ids`` (in that order)."""
    stored = np.load(folder / "image_ids.npy")
    ids = np.asarray(ids, np.int64)
    if stored.shape != ids.shape or not np.array_equal(stored, ids):
        n_same = int(np.isin(ids, stored).sum())
        raise ValueError(f"feature cache {folder} was written for other images: it holds {len(stored)} image ids, this "
                         f"run needs {len(ids)} ({n_same} of them in the cache, in another order or set). Delete "
                         f"{folder} (it is recomputed) or point paths.cache_dir elsewhere")
    return np.load(folder / "features.npy", mmap_mode="r")


def cached_features(network: nn.Module, root: nn.Module, images, ids: np.ndarray, layers: Sequence[str], *,
                    backbone: str, identity: Mapping, pool: int | None, image_size: int,
                    cache_dir: str | Path | None, batch_size: int = 64, progress: bool = True) -> dict[str, np.ndarray]:
    """``{layer: (N, D) float32}`` features of ``images`` (a dataset or tensor whose rows are the images
    ``ids``) at each layer of ``root`` (inside ``network``), pooled with ``pool``.

    Layers already cached (same ``identity`` = backbone and weights fingerprint, pooling, image size, ids) are
    read as memory maps; the others are extracted in one pass and cached. ``cache_dir=None``: no cache.
    """
    ids = np.asarray(ids, np.int64)
    out: dict[str, np.ndarray] = {}
    todo = []
    for layer in layers:
        folder = None if cache_dir is None else feature_folder(cache_dir, backbone, layer, identity, pool, image_size, ids)
        if folder is not None and (folder / "meta.json").exists():
            out[layer] = read_features(folder, ids)
            log.info("features of %s %s: read from the cache %s", backbone, layer, folder)
        else:
            todo.append((layer, folder))
    if todo:
        if hasattr(network, "to") and torch.cuda.is_available():
            network = network.to("cuda")
        acts = activations(network, images, [layer for layer, _ in todo], batch_size=batch_size, pool=pool, root=root,
                           progress=progress)
        for layer, folder in todo:
            a = acts[layer].numpy().astype(np.float32, copy=False)
            if folder is None:
                out[layer] = a
                continue
            with atomic_dir(folder, complete=lambda f: (f / "meta.json").exists()) as tmp:
                np.save(tmp / "features.npy", a)
                np.save(tmp / "image_ids.npy", ids)
                write_json(tmp / "meta.json", {"backbone": backbone, "layer": layer, "identity": dict(identity),
                                                "pool": pool, "image_size": int(image_size), "shape": list(a.shape)})
            out[layer] = read_features(folder, ids)
            log.info("features of %s %s: %s extracted and cached in %s", backbone, layer, a.shape, folder)
    return {layer: out[layer] for layer in layers}
