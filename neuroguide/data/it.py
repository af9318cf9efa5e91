"""IT recordings: one HDF5 file, read and checked; splits by image; split-half reliability.

File format (DESIGN.md; written for tests by :mod:`neuroguide.data.synthetic.it`):

- ``images`` (N, H, W, 3) uint8, one row per unique image,
- ``responses`` (N, sites, repeats) float (spike rates or counts), NaN where a repeat is missing,
- ``site_ids`` (sites,) and ``image_ids`` (N,) strings (or integers),
- attributes describing the response window, e.g. ``time_window_ms = [70, 170]`` (Guo et al. count
  spikes 70-170 ms after image onset), read into :attr:`ITRecordings.attrs`.

Each image id appears once (a file with repeated ids is refused: average the repeats into one row, or stack them
along the repeats axis). An image whose responses are all NaN (no site, no repeat recorded) is left out with one
warning naming the file and the count; a file where no image has any response is refused.

The target of a site on an image is the mean over its recorded repeats. The noise ceiling is the
split-half reliability ``R`` of that mean: the repeats of each image are split at random into two halves,
the half means are correlated over images (Pearson r, averaged over ``n_splits`` random splits), and r is
stepped up to the reliability of the mean of all the repeats (:func:`step_up_reliability`: Spearman-Brown,
generalized to halves of unequal size, e.g. 1 and 2 of 3 repeats, and to images with different numbers of
recorded repeats). A model that predicts the noise-free response perfectly reaches ``r = sqrt(R)``;
``r / sqrt(R)`` is the corrected r (the correction for attenuation: divided by the square root of R).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from neuroguide.data.hdf5_images import HDF5Images
from neuroguide.data.loaders import eval_loader, train_loader
from neuroguide.metrics import nan_pearson_r

log = logging.getLogger("neuroguide")

REQUIRED = ("images", "responses", "site_ids", "image_ids")


def _strings(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).ravel()])


def check_images(images, where: str) -> None:
    """Raise a ValueError naming ``where`` unless ``images`` is (N, H, W, 3) uint8."""
    shape, dtype = tuple(images.shape), np.dtype(images.dtype)
    if dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8 (N, H, W, 3) in 0..255; found dtype {dtype} shape {shape}. "
                         "Convert float images in [0, 1] with (x * 255).round().astype(np.uint8)")
    if len(shape) != 4 or shape[-1] != 3:
        hint = (" (channels first: store images.transpose(0, 2, 3, 1))" if len(shape) == 4 and shape[1] == 3 else
                " (grey images: repeat them to 3 channels)" if len(shape) == 3 else "")
        raise ValueError(f"{where}: images must have shape (N, H, W, 3); found {shape}{hint}")


def check_responses(responses: np.ndarray, n_images: int, where: str) -> np.ndarray:
    """(N, sites, repeats) float32 copy of ``responses``; a ValueError naming ``where`` otherwise."""
    r = np.asarray(responses)
    if not (np.issubdtype(r.dtype, np.floating) or np.issubdtype(r.dtype, np.integer)) or r.dtype == bool:
        raise ValueError(f"{where}: responses must be float (N, sites, repeats) with NaN for missing repeats; "
                         f"found dtype {r.dtype}")
    if r.ndim != 3:
        hint = " (one value per image and site: store responses[..., None] as a single repeat)" if r.ndim == 2 else ""
        raise ValueError(f"{where}: responses must have shape (N, sites, repeats); found {r.shape}{hint}")
    if r.shape[0] != n_images:
        raise ValueError(f"{where}: responses has {r.shape[0]} rows but images has {n_images}; row i of both "
                         "must be the same image")
    r = r.astype(np.float32)
    if np.isinf(r).any():
        raise ValueError(f"{where}: responses contain inf; use NaN for missing repeats")
    return r


@dataclass
class ITRecordings:
    """The checked content of an IT file (images stay on disk, read lazily by :class:`ITImages`).

    responses: (N, sites, repeats) float32 with NaN for missing repeats.
    """

    path: Path
    responses: np.ndarray
    site_ids: np.ndarray
    image_ids: np.ndarray
    image_shape: tuple[int, int]
    attrs: dict = field(default_factory=dict)
    rows: np.ndarray | None = None  # (N,) the row of ``images`` in the file of each row here (None: the same rows)

    @property
    def n_images(self) -> int:
        return self.responses.shape[0]

    @property
    def n_sites(self) -> int:
        return self.responses.shape[1]

    def file_rows(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The rows of the file's ``images`` that ``rows`` of these recordings (default: all) show."""
        index = np.arange(self.n_images) if self.rows is None else np.asarray(self.rows)
        return index if rows is None else index[np.asarray(rows)]

    def mean_response(self, rows: np.ndarray | None = None) -> np.ndarray:
        """(N, sites) mean over the recorded repeats (NaN where none was recorded)."""
        r = self.responses if rows is None else self.responses[rows]
        return nanmean(r, axis=2)


def nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """np.nanmean without the all-NaN warning (all-NaN slices give NaN)."""
    n = np.sum(~np.isnan(x), axis=axis)
    s = np.nansum(x, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1), np.nan).astype(np.float32)


def _listed(ids, n: int = 5) -> str:
    ids = [str(i) for i in ids]
    return ", ".join(ids[:n]) + (", ..." if len(ids) > n else "")


def read_it(path: str | os.PathLike, key: str = "paths.it_file", unrecorded: str = "drop") -> ITRecordings:
    """Read and check the IT file at ``path`` (see the module docstring for the format); ``key`` is the config key
    that named it (for the messages: ``paths.it_file``, ``recordings``, ``eval.selection.it_file``).

    ``unrecorded``: images whose responses are all NaN are left out (``"drop"``, with one warning naming the file
    and the count; :attr:`ITRecordings.rows` then maps the kept rows to the file's images) or kept as NaN rows
    (``"keep"``, also with a warning). Every image unrecorded: a ValueError."""
    path = Path(path).expanduser()
    if not path.is_file():
        extra = ", or use data=synthetic" if key == "paths.it_file" else ""
        raise FileNotFoundError(f"IT recordings file {path} does not exist: set {key}= to an existing HDF5 file "
                                f"(format in neuroguide/data/it.py){extra}")
    with h5py.File(path, "r") as f:
        missing = [k for k in REQUIRED if k not in f]
        if missing:
            raise KeyError(f"{path} lacks dataset(s) {missing}; an IT file holds images (N, H, W, 3) uint8, "
                           "responses (N, sites, repeats) float, site_ids (sites,), image_ids (N,). "
                           f"Found: {sorted(f)}")
        check_images(f["images"], f"{path}:images")
        n, h, w, _ = f["images"].shape
        responses = check_responses(f["responses"][()], n, f"{path}:responses")
        site_ids, image_ids = _strings(f["site_ids"][()]), _strings(f["image_ids"][()])
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}
    if len(site_ids) != responses.shape[1]:
        raise ValueError(f"{path}: site_ids has {len(site_ids)} entries but responses has {responses.shape[1]} sites")
    if len(image_ids) != n:
        raise ValueError(f"{path}: image_ids has {len(image_ids)} entries but there are {n} images")
    uniq, counts = np.unique(image_ids, return_counts=True)
    dup = uniq[counts > 1]
    if len(dup):
        raise ValueError(f"{path}: {len(dup)} image ids occur more than once ({int(counts[counts > 1].sum())} of {n} rows"
                         f"), e.g. {_listed(dup)}; one row per unique image is expected (a row's repeats go along the "
                         "last axis of responses). Fix: average the repeats of an image into one row (or stack them "
                         "as repeats of its row), or give different images distinct ids")
    empty = np.where(np.isnan(responses).all(axis=(0, 2)))[0]
    if len(empty):
        log.warning("%s: sites %s have no recorded response at all", path, site_ids[empty][:10].tolist())
    if unrecorded not in ("drop", "keep"):
        raise ValueError(f"unrecorded={unrecorded!r}: expected 'drop' or 'keep'")
    blank = np.isnan(responses).all(axis=(1, 2))
    rows = None
    if blank.all():
        raise ValueError(f"{path}: none of its {n} images has a recorded response (responses are all NaN): check the "
                         "file (responses (N, sites, repeats), NaN only where a repeat is missing)")
    if blank.any():
        what = "left out" if unrecorded == "drop" else "kept as NaN rows"
        log.warning("%s: %d of %d images have no recorded response (all sites and repeats NaN), e.g. ids %s: %s",
                    path, int(blank.sum()), n, _listed(image_ids[blank]), what)
        if unrecorded == "drop":
            rows = np.flatnonzero(~blank)
            responses, image_ids = responses[rows], image_ids[rows]
    return ITRecordings(path, responses, site_ids, image_ids, (int(h), int(w)), attrs, rows)


class ITImages(HDF5Images):
    """Item ``i``: image row ``rows[i]`` of the file's ``images`` as (3, S, S) float in [0, 1] (antialiased
    resize)."""

    def __init__(self, path: str | os.PathLike, rows: np.ndarray, image_size: int):
        super().__init__(path, "images", rows, image_size)


class ITResponseDataset(Dataset):
    """(image (3, S, S) in [0, 1], mean response over repeats (sites,) float32 with NaN) pairs."""

    def __init__(self, images: ITImages, targets: np.ndarray):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images, self.targets = images, torch.from_numpy(np.ascontiguousarray(targets, np.float32))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def split_by_image(image_ids: np.ndarray, val_fraction: float = 0.1, test_fraction: float = 0.2,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of each split ("train", "val", "test"); rows sharing an image id stay in one split."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) with a "
                         "sum below 1")
    uniq, inverse = np.unique(np.asarray(image_ids), return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(uniq))
    n_test = int(round(test_fraction * len(uniq)))
    n_val = int(round(val_fraction * len(uniq)))
    if len(uniq) - n_test - n_val < 2 or (test_fraction > 0 and n_test < 2) or (val_fraction > 0 and n_val < 2):
        raise ValueError(f"{len(uniq)} unique images are too few for val_fraction={val_fraction}, "
                         f"test_fraction={test_fraction} (each split needs at least 2 images)")
    split_of = np.empty(len(uniq), dtype=object)
    split_of[order[:n_test]] = "test"
    split_of[order[n_test:n_test + n_val]] = "val"
    split_of[order[n_test + n_val:]] = "train"
    rows = split_of[inverse]
    return {s: np.where(rows == s)[0] for s in ("train", "val", "test")}


def step_up_reliability(r, inv_a, inv_b, inv_n):
    """The reliability of a mean of repeats from the correlation ``r`` of two half means (arrays broadcast).

    Model: repeat ``j`` of an image is ``s + e_j``, signal variance ``S`` over images, independent noise of
    variance ``E`` (single-trial reliability ``rho = S / (S + E)``, ``q = E / S = (1 - rho) / rho``). The mean of
    ``k`` repeats has reliability ``R_k = 1 / (1 + q / k) = k rho / (1 + (k - 1) rho)``, and two disjoint half
    means of ``n1`` and ``n2`` repeats correlate as ``r = S / sqrt((S + E / n1)(S + E / n2)) = sqrt(R_n1 R_n2)``.
    When images have different numbers of repeats, ``E / n`` averages to ``E * mean(1 / n)`` over images, so

        inv_a = mean(1 / n1), inv_b = mean(1 / n2)   (the two halves, over the images r is taken on)
        inv_n = mean(1 / n)                           (the whole mean, over the images it is used on)

    Solving ``(1 + inv_a q)(1 + inv_b q) = 1 / r^2`` for ``q >= 0`` and substituting into ``R = 1 / (1 + inv_n q)``::

        R = (r^2 (inv_a + inv_b) + r D) / (r^2 (inv_a + inv_b) + r D + 2 inv_n (1 - r^2)),
        D = sqrt(r^2 (inv_a - inv_b)^2 + 4 inv_a inv_b)

    Equal halves (``inv_a = inv_b = 2 inv_n``) give Spearman-Brown's ``2 r / (1 + r)``; with 3 repeats (halves of 1
    and 2) Spearman-Brown would be too low (by 3.6% at rho = 0.3, 5.3% at rho = 0.05, 1.4% at rho = 0.7), so
    ``r / sqrt(R)`` too high by about half that (1.8% at rho = 0.3). ``r <= 0`` (no detectable signal) gives ``-R(|r|)`` (<= 0: the corrected r is then NaN);
    NaN stays NaN. Remaining bias: ``r`` is a ratio estimate, slightly biased over few images.
    """
    r = np.asarray(r, np.float64)
    inv_a, inv_b, inv_n = (np.asarray(v, np.float64) for v in (inv_a, inv_b, inv_n))
    a = np.abs(r)
    d = np.sqrt(a * a * (inv_a - inv_b) ** 2 + 4 * inv_a * inv_b)
    num = a * a * (inv_a + inv_b) + a * d
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = num / (num + 2 * inv_n * (1 - a * a))
    return np.sign(r) * rel


def _mean_inverse(n: np.ndarray, use: np.ndarray) -> np.ndarray:
    """(sites,) mean of ``1 / n`` over the images where ``use`` (N, sites); NaN for a site with none."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(use, 1.0 / np.maximum(n, 1), 0).sum(0) / use.sum(0)


def split_half_reliability(responses: np.ndarray, n_splits: int = 10, seed: int = 0) -> np.ndarray:
    """Split-half reliability of each site's mean response over its recorded repeats, (sites,).

    Args:
        responses: (N, sites, repeats) with NaN for missing repeats. On each of ``n_splits`` random
            splits, the k recorded repeats of an image are shuffled and split into halves of
            k // 2 and k - k // 2 repeats; images with k < 2 are skipped.
    Returns:
        the split-half Pearson r averaged over splits, stepped up to the reliability of the mean of each
        image's k recorded repeats (:func:`step_up_reliability`, with the mean ``1 / n`` of each half over the
        images with k >= 2 and of the whole over the images with k >= 1; ``2 r / (1 + r)`` when every k is
        even); NaN where a site has fewer than 3 images with 2 repeats.
    """
    r = np.asarray(responses, np.float64)
    if r.ndim != 3:
        raise ValueError(f"split_half_reliability needs (N, sites, repeats); got {r.shape}")
    rng = np.random.default_rng(seed)
    valid = ~np.isnan(r)
    k = valid.sum(2)
    half = k // 2
    rs = []
    for _ in range(int(n_splits)):
        keys = np.where(valid, rng.random(r.shape), np.inf)
        rank = np.argsort(np.argsort(keys, axis=2), axis=2)  # recorded repeats first, in random order
        a = rank < half[..., None]
        b = (rank >= half[..., None]) & valid
        with np.errstate(invalid="ignore", divide="ignore"):
            ma = np.where(a, r, 0).sum(2) / half
            mb = np.where(b, r, 0).sum(2) / (k - half)
        ma[half == 0], mb[half == 0] = np.nan, np.nan
        rs.append(nan_pearson_r(torch.from_numpy(ma), torch.from_numpy(mb)).double().numpy())
    rbar = np.mean(rs, axis=0)
    split = half > 0
    rel = step_up_reliability(rbar, _mean_inverse(half, split), _mean_inverse(k - half, split),
                              _mean_inverse(k, k > 0))
    return rel.astype(np.float32)


class ITDataModule(L.LightningDataModule):
    """IT recordings split by image: (image in [0, 1] resized to ``image_size``, mean response) batches.

    After ``setup``: ``n_sites``, ``site_ids``, ``train_mean`` (sites,) for the readout bias, and
    ``reliability[split]`` (sites,), the split-half noise ceiling on that split's images.
    """

    def __init__(self, path: str, image_size: int = 224, batch_size: int = 64, num_workers: int = 0,
                 val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0, reliability_splits: int = 10):
        super().__init__()
        if path is None:
            raise FileNotFoundError("task=it_encoding needs IT recordings: set paths.it_file=/path/to/it.h5 (format "
                                    "in neuroguide/data/it.py), or use data=synthetic")
        self.path, self.image_size = Path(path).expanduser(), int(image_size)
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.reliability_splits = int(reliability_splits)
        self.recordings: ITRecordings | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.recordings is not None:
            return
        rec = self.recordings = read_it(self.path)
        self.rows = split_by_image(rec.image_ids, self.val_fraction, self.test_fraction, self.seed)
        self.sets, self.reliability = {}, {}
        for split, rows in self.rows.items():
            images = ITImages(self.path, rec.file_rows(rows), self.image_size)
            self.sets[split] = ITResponseDataset(images, rec.mean_response(rows))
            if len(rows) >= 3:
                self.reliability[split] = split_half_reliability(rec.responses[rows], self.reliability_splits,
                                                                 self.seed)
        self.train_mean = nanmean(rec.mean_response(self.rows["train"]), axis=0)

    @property
    def n_sites(self) -> int:
        return self.recordings.n_sites

    @property
    def site_ids(self) -> np.ndarray:
        return self.recordings.site_ids

    def train_dataloader(self):
        ws = self.trainer.world_size if self.trainer is not None else 1
        return train_loader(self.sets["train"], self.batch_size, self.num_workers, self.seed, ws)

    def val_dataloader(self):
        return eval_loader(self.sets["val"], self.batch_size, self.num_workers)

    def test_dataloader(self):
        return eval_loader(self.sets["test"], self.batch_size, self.num_workers)
