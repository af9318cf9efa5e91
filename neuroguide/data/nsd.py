"""Natural Scenes Dataset (NSD) reader for the real on-disk layout.

Paths are relative to ``nsd_root`` (see DESIGN.md):

- betas ``nsddata_betas/ppdata/subjXX/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_sessionNN.{nii.gz,hdf5}``;
  int16 = percent signal change x 300 (divided by 300 here). NIfTI is (X, Y, Z, trials); the HDF5
  dataset ``betas`` stores the axes reversed (trials, Z, Y, X). Trials per session come from the file.
- ROI volumes ``nsddata/ppdata/subjXX/func1pt8mm/roi/<atlas>.nii.gz``: 0 unlabeled, -1 outside brain.
- design ``nsddata/experiments/nsd/nsd_expdesign.mat``: image of trial t of subject s is
  ``subjectim[s - 1, masterordering[t] - 1] - 1`` (0-based 73k id); ``sharedix`` are 1-based 73k ids.
- stimuli ``nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5`` dataset ``imgBrick`` (73000, 425, 425, 3) uint8.

:func:`extract_regions` reads each session file once for all requested regions, z-scores each
voxel within its session, averages the repeats of each image, splits test = shared images, and
caches each region as memory-mappable ``.npy`` arrays keyed by a hash of inputs and parameters.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import nibabel as nib
import numpy as np
import scipy.io

from neuroguide.utils.io import atomic_dir, file_fingerprint, hash_inputs, read_json, require, write_json

log = logging.getLogger("neuroguide")

BETA_SCALE = 300.0
BETAS_SUBDIR = "betas_fithrf_GLMdenoise_RR"


# ----------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class NSDPaths:
    """Where each NSD file of one subject lives under ``root``."""

    root: Path
    subject: int

    def __post_init__(self):
        if not isinstance(self.subject, int) or not 1 <= self.subject <= 8:
            raise ValueError(f"subject must be an integer 1..8 (config key `subject`), got {self.subject!r}")
        object.__setattr__(self, "root", Path(self.root).expanduser())

    @property
    def subj(self) -> str:
        return f"subj{self.subject:02d}"

    @property
    def betas_dir(self) -> Path:
        return self.root / "nsddata_betas" / "ppdata" / self.subj / "func1pt8mm" / BETAS_SUBDIR

    @property
    def roi_dir(self) -> Path:
        return self.root / "nsddata" / "ppdata" / self.subj / "func1pt8mm" / "roi"

    @property
    def expdesign(self) -> Path:
        return self.root / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat"

    @property
    def stimuli(self) -> Path:
        return self.root / "nsddata_stimuli" / "stimuli" / "nsd" / "nsd_stimuli.hdf5"

    @property
    def ncsnr(self) -> Path:
        return self.betas_dir / "ncsnr.nii.gz"

    def roi(self, atlas: str) -> Path:
        return self.roi_dir / f"{atlas}.nii.gz"

    def sessions(self, fmt: str = "nii.gz") -> list[Path]:
        """Session beta files present, sorted by session number (see :func:`session_number`)."""
        if fmt not in ("nii.gz", "hdf5"):
            raise ValueError(f"betas_format must be 'nii.gz' or 'hdf5', got {fmt!r}")
        if not self.betas_dir.is_dir():
            raise FileNotFoundError(
                f"NSD betas folder {self.betas_dir} does not exist. Set paths.nsd_root to the folder that "
                f"holds nsddata_betas/ (and subject=1..8 to a subject you have).")
        pat = re.compile(r"betas_session(\d+)\." + re.escape(fmt) + "$")
        found = sorted((int(m.group(1)), p) for p in self.betas_dir.iterdir() if (m := pat.match(p.name)))
        if not found:
            raise FileNotFoundError(f"no betas_sessionNN.{fmt} files in {self.betas_dir} (data.betas_format={fmt})")
        return [p for _, p in found]


def session_number(path: Path) -> int:
    """``betas_session07.nii.gz`` -> 7."""
    m = re.search(r"betas_session(\d+)\.", Path(path).name)
    if not m:
        raise ValueError(f"{path} is not named betas_sessionNN.<format>")
    return int(m.group(1))


def session_offsets(sessions: Sequence[Path], counts: Sequence[int]) -> np.ndarray:
    """Global index of the first trial of each session file: trial t of session s is global trial
    ``(s - 1) * trials_per_session + t``, so a missing session never shifts the ones after it.

    Sessions 1..N all present: the cumulative counts (any counts). With a gap, every session present
    must hold the same number of trials (750 in NSD), which is then the trials per session (a warning
    names the missing files); otherwise a ValueError names them and the fix.
    """
    numbers = [session_number(p) for p in sessions]
    counts = [int(c) for c in counts]
    if numbers == list(range(1, len(numbers) + 1)):
        return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    folder, suffix = Path(sessions[0]).parent, Path(sessions[0]).name.split(".", 1)[1]
    missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
    names = ", ".join(f"betas_session{m:02d}.{suffix}" for m in missing)
    if len(set(counts)) > 1:
        raise ValueError(
            f"{folder}: {names} missing, and the sessions present hold different numbers of trials "
            f"({dict(zip(numbers, counts))}), so the trials after the gap cannot be paired with their images. "
            f"Restore the missing files, or read only the sessions before the first gap with "
            f"data.max_sessions={missing[0] - 1}.")
    log.warning("%s: %s missing; trials are paired with images by session number (%d trials per session)",
                folder, names, counts[0])
    return np.asarray([(n - 1) * counts[0] for n in numbers], np.int64)


# ----------------------------------------------------------------------------- design
@dataclass
class Design:
    """``nsd_expdesign.mat``: masterordering (T,), subjectim (8, n), sharedix (n_shared,), all 1-based."""

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray

    @classmethod
    def read(cls, path: Path) -> "Design":
        d = scipy.io.loadmat(require(path, "NSD design file nsd_expdesign.mat"))
        for k in ("masterordering", "subjectim", "sharedix"):
            if k not in d:
                raise KeyError(f"{path} has no variable {k!r}; is it the NSD nsd_expdesign.mat?")
        return cls(np.asarray(d["masterordering"]).ravel().astype(np.int64),
                   np.asarray(d["subjectim"]).astype(np.int64),
                   np.asarray(d["sharedix"]).ravel().astype(np.int64))

    def trial_images(self, subject: int, trials: int | np.ndarray) -> np.ndarray:
        """0-based 73k image id of each trial of ``subject``: of the first ``trials`` trials (an int), or
        of the given 0-based global trial indices (an array)."""
        t = np.arange(trials) if np.ndim(trials) == 0 else np.asarray(trials, np.int64)
        if len(t) and t.max() >= len(self.masterordering):
            raise ValueError(f"the beta files hold trial {t.max() + 1} but masterordering has only "
                             f"{len(self.masterordering)} trials")
        return self.subjectim[subject - 1, self.masterordering[t] - 1] - 1

    @property
    def shared_images(self) -> np.ndarray:
        """0-based 73k ids of the shared images (the test split)."""
        return self.sharedix - 1


# ----------------------------------------------------------------------------- betas, ROIs
def read_volume(path: Path) -> np.ndarray:
    """A NIfTI volume as a numpy array (X, Y, Z[, T])."""
    return np.asarray(nib.load(str(require(path, "NIfTI volume"))).dataobj)


def read_session(path: Path, flat_index: np.ndarray, volume_shape: tuple) -> np.ndarray:
    """Betas of one session at the given voxels: (trials, n_voxels) float32, in percent signal change.

    ``flat_index`` indexes the C-order flattened (X, Y, Z) volume. The file is read once.
    """
    path = Path(path)
    if path.name.endswith(".hdf5"):
        with h5py.File(path, "r") as f:
            if "betas" not in f:
                raise KeyError(f"{path} has no dataset 'betas'")
            data = f["betas"][()]  # (T, Z, Y, X)
        if data.shape[1:] != tuple(volume_shape)[::-1]:
            raise ValueError(f"{path}: betas shape {data.shape} does not match ROI volume {volume_shape} "
                             "(expected trials x Z x Y x X)")
        x, y, z = np.unravel_index(flat_index, volume_shape)
        out = data[:, z, y, x]
    else:
        img = nib.load(str(path))
        if tuple(img.shape[:3]) != tuple(volume_shape):
            raise ValueError(f"{path}: betas shape {img.shape} does not match ROI volume {volume_shape}")
        data = np.asarray(img.dataobj)  # (X, Y, Z, T)
        out = data.reshape(-1, data.shape[-1])[flat_index].T
    out = out.astype(np.float32) / BETA_SCALE
    if not np.isfinite(out).all():
        raise ValueError(f"{path} holds NaN or inf betas inside the requested regions")
    return out


def zscore_session(b: np.ndarray) -> np.ndarray:
    """Z-score each voxel (column) over the trials of one session; constant voxels become 0."""
    mu = b.mean(0, keepdims=True)
    sd = b.std(0, keepdims=True)
    return np.where(sd > 0, (b - mu) / np.where(sd > 0, sd, 1), 0).astype(np.float32)


def average_repeats(responses: np.ndarray, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average trials of the same image: (T, V), (T,) -> images (n,), mean (n, V), repeats (n,)."""
    import scipy.sparse

    images, inverse, counts = np.unique(image_ids, return_inverse=True, return_counts=True)
    # a sparse (n_images, T) averaging matrix: row i holds 1/count_i at the trials of image i
    avg = scipy.sparse.csr_matrix((1.0 / counts[inverse], (inverse, np.arange(len(image_ids)))),
                                  shape=(len(images), len(image_ids)))
    return images, np.asarray(avg @ responses.astype(np.float64), np.float32), counts


def noise_ceiling(ncsnr: np.ndarray, n: float | np.ndarray) -> np.ndarray:
    """NSD noise ceiling in percent of variance: ``NC = 100 * ncsnr^2 / (ncsnr^2 + 1/n)``.

    ``n`` is the number of trials averaged per image; with mixed repeat counts pass
    :func:`effective_repeats` of the counts (``1/n`` = the mean of ``1/n_i``), not their mean.
    """
    ncsnr = np.asarray(ncsnr, np.float64)
    return 100.0 * ncsnr**2 / (ncsnr**2 + 1.0 / np.asarray(n, np.float64))


def effective_repeats(counts: np.ndarray) -> float:
    """The ``n`` of NSD's noise ceiling for images averaged over ``counts`` (n_i,) trials each:
    ``1/n = mean_i 1/n_i``, i.e. ``(A/3 + B/2 + C/1) / (A + B + C)`` for A, B, C images with 3, 2, 1 repeats
    (the harmonic mean of the counts; their arithmetic mean would overstate the ceiling)."""
    counts = np.asarray(counts, np.float64)
    if counts.size == 0 or (counts < 1).any():
        raise ValueError(f"repeat counts must be >= 1 for every image, got {counts}")
    return float(1.0 / np.mean(1.0 / counts))


# ----------------------------------------------------------------------------- regions
@dataclass(frozen=True)
class RegionSpec:
    """A region: labels of one atlas volume, optionally intersected with a mask volume."""

    name: str
    atlas: str
    labels: tuple
    intersect: str | None = None

    @classmethod
    def from_config(cls, cfg: Mapping) -> "RegionSpec":
        for k in ("name", "atlas", "labels"):
            if k not in cfg or cfg[k] is None:
                raise KeyError(f"region config lacks `{k}` (see conf/region/*.yaml): {dict(cfg)}")
        return cls(str(cfg["name"]), str(cfg["atlas"]), tuple(int(v) for v in cfg["labels"]),
                   cfg.get("intersect"))

    def mask(self, paths: NSDPaths, volumes: dict) -> np.ndarray:
        """Boolean (X, Y, Z) mask of the region (labels > 0 only; -1 is outside the brain)."""
        vol = volumes.setdefault(self.atlas, read_volume(paths.roi(self.atlas)))
        m = np.isin(vol, self.labels) & (vol > 0)
        if self.intersect:
            g = volumes.setdefault(self.intersect, read_volume(paths.roi(self.intersect)))
            if g.shape != vol.shape:
                raise ValueError(f"{paths.roi(self.intersect)} shape {g.shape} differs from {paths.roi(self.atlas)}")
            m &= g > 0
        if not m.any():
            raise ValueError(f"region {self.name}: no voxel of {paths.roi(self.atlas)} has labels {self.labels}"
                             + (f" inside {self.intersect}" if self.intersect else ""))
        return m


@dataclass
class RegionData:
    """One region's preprocessed responses (arrays may be read-only memory maps).

    train_images / test_images: (n,) 0-based 73k ids; train / test: (n, V) z-scored, repeat-averaged
    responses; test_repeats: (n_test,) repeats averaged; ncsnr and nc: (V,) noise-ceiling SNR and
    noise ceiling (percent) of the test responses (``n`` = :func:`effective_repeats` of test_repeats);
    pca_*: optional PCA fitted on train.
    """

    region: str
    train_images: np.ndarray
    train: np.ndarray
    test_images: np.ndarray
    test: np.ndarray
    test_repeats: np.ndarray
    ncsnr: np.ndarray
    nc: np.ndarray
    voxel_index: np.ndarray
    pca_components: np.ndarray | None = None  # (k, V)
    pca_mean: np.ndarray | None = None  # (V,)
    meta: dict = field(default_factory=dict)

    @property
    def n_voxels(self) -> int:
        return self.train.shape[1]

    @property
    def n_outputs(self) -> int:
        return self.n_voxels if self.pca_components is None else self.pca_components.shape[0]

    def targets(self, split: str) -> np.ndarray:
        """What the predictor is trained to output: voxels, or PCA scores when PCA is on."""
        y = self.train if split == "train" else self.test
        if self.pca_components is None:
            return np.asarray(y)
        return ((np.asarray(y) - self.pca_mean) @ self.pca_components.T).astype(np.float32)

    _ARRAYS = ("train_images", "train", "test_images", "test", "test_repeats", "ncsnr", "nc", "voxel_index",
               "pca_components", "pca_mean")

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for k in self._ARRAYS:
            v = getattr(self, k)
            if v is not None:
                np.save(folder / f"{k}.npy", np.ascontiguousarray(v))
        write_json(folder / "meta.json", {"region": self.region, **self.meta})

    @classmethod
    def load(cls, folder: Path, mmap: bool = True) -> "RegionData":
        meta = read_json(folder / "meta.json")
        arrays = {k: (np.load(folder / f"{k}.npy", mmap_mode="r" if mmap else None)
                      if (folder / f"{k}.npy").exists() else None) for k in cls._ARRAYS}
        return cls(region=meta.pop("region"), meta=meta, **arrays)


def fit_pca(train: np.ndarray, variance: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """PCA keeping ``variance`` of the train variance: components (k, V), mean (V,)."""
    mean = train.mean(0)
    _, s, vt = np.linalg.svd(train - mean, full_matrices=False)
    ratio = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.searchsorted(ratio, variance) + 1)
    return vt[:k].astype(np.float32), mean.astype(np.float32)


# ----------------------------------------------------------------------------- one-pass extraction
def _cache_key(paths: NSDPaths, spec: RegionSpec, sessions: list[Path], params: dict) -> str:
    files = [paths.expdesign, paths.ncsnr, *(paths.roi(a) for a in sorted({spec.atlas, spec.intersect} - {None})), *sessions]
    return hash_inputs(spec.__dict__, params, paths.subject, [file_fingerprint(f) for f in files])


def extract_regions(root: str | Path, subject: int, regions: Sequence[RegionSpec | Mapping], *,
                    cache_dir: str | Path | None = None, betas_format: str = "nii.gz",
                    max_sessions: int | None = None, pca: bool = False, pca_variance: float = 0.95,
                    progress: bool = True) -> dict[str, RegionData]:
    """Preprocess several regions of one subject, reading each session file once.

    Steps: trial -> image mapping from the design; per session, the union of all region voxels is
    read and z-scored per voxel; repeats of each image are averaged; test split = shared images;
    optional PCA (``pca_variance`` of the variance, fitted on train only). Regions already in
    ``cache_dir`` (same inputs and parameters) are loaded as memory maps and not recomputed.
    """
    paths = NSDPaths(root, int(subject))
    specs = [r if isinstance(r, RegionSpec) else RegionSpec.from_config(r) for r in regions]
    sessions = paths.sessions(betas_format)
    if max_sessions:
        sessions = [p for p in sessions if session_number(p) <= int(max_sessions)]
        if not sessions:
            raise FileNotFoundError(f"data.max_sessions={max_sessions}: no betas_sessionNN.{betas_format} file with "
                                    f"NN <= {max_sessions} in {paths.betas_dir}")
    # v2: session-number trial offsets, harmonic-mean repeats in the noise ceiling
    params = {"betas_format": betas_format, "pca": bool(pca), "pca_variance": float(pca_variance), "v": 2}
    out: dict[str, RegionData] = {}
    todo: list[tuple[RegionSpec, Path | None]] = []
    for spec in specs:
        folder = None
        if cache_dir is not None:
            folder = Path(cache_dir) / f"{paths.subj}_{spec.name}_{_cache_key(paths, spec, sessions, params)}"
            if (folder / "meta.json").exists():
                out[spec.name] = RegionData.load(folder)
                continue
        todo.append((spec, folder))
    if not todo:
        return out

    design = Design.read(paths.expdesign)
    volumes: dict[str, np.ndarray] = {}
    masks = [spec.mask(paths, volumes) for spec, _ in todo]
    shape = masks[0].shape
    union = np.zeros(shape, bool)
    for m in masks:
        union |= m
    flat = np.flatnonzero(union.ravel())
    cols = [np.searchsorted(flat, np.flatnonzero(m.ravel())) for m in masks]

    from tqdm.auto import tqdm

    chunks = []
    for s in tqdm(sessions, desc=f"NSD {paths.subj} sessions", disable=not progress):
        chunks.append(zscore_session(read_session(s, flat, shape)))
    counts_per_session = [len(c) for c in chunks]
    offsets = session_offsets(sessions, counts_per_session)
    trials = np.concatenate([o + np.arange(n) for o, n in zip(offsets, counts_per_session)])
    n_trials = len(trials)
    responses = np.concatenate(chunks)
    image_ids = design.trial_images(paths.subject, trials)
    images, means, counts = average_repeats(responses, image_ids)
    is_test = np.isin(images, design.shared_images)
    if not is_test.any():
        raise ValueError(f"none of the images of {paths.subj} in the {len(sessions)} sessions read is a shared "
                         "image (sharedix): there is no test split")
    ncsnr_all = read_volume(require(paths.ncsnr, "ncsnr volume")).ravel()[flat].astype(np.float32)
    n_test_rep = effective_repeats(counts[is_test])
    for (spec, folder), c in zip(todo, cols):
        rd = RegionData(
            region=spec.name, train_images=images[~is_test], train=means[~is_test][:, c],
            test_images=images[is_test], test=means[is_test][:, c], test_repeats=counts[is_test],
            ncsnr=ncsnr_all[c], nc=noise_ceiling(ncsnr_all[c], n_test_rep).astype(np.float32),
            voxel_index=flat[c],
            meta={"subject": paths.subject, "sessions": len(sessions),
                  "session_numbers": [session_number(p) for p in sessions], "trials": n_trials,
                  "volume_shape": list(shape), "test_repeats_effective": n_test_rep, **params})
        if pca:
            rd.pca_components, rd.pca_mean = fit_pca(rd.train, pca_variance)
        if folder is not None:
            _save_atomic(rd, folder)
            rd = RegionData.load(folder)
        out[spec.name] = rd
    return out


def _save_atomic(rd: RegionData, folder: Path) -> None:
    """Write the region folder under a temporary name, then rename; a concurrent writer's copy wins."""
    with atomic_dir(folder, complete=lambda f: (f / "meta.json").exists()) as tmp:
        rd.save(tmp)

