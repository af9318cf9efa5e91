"""NSD regions: their specs (``conf/region/*.yaml``), one-pass extraction, and the cache.

:func:`extract_regions` reads each session file once for all requested regions, z-scores each
voxel within its session, averages the repeats of each image, splits test = shared images, and
caches each region as memory-mappable ``.npy`` arrays keyed by a hash of inputs and parameters.
:func:`load_region` reads a region's config by name.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from neuroguide.data.nsd import (Design, NSDPaths, RepeatMeans, effective_repeats, noise_ceiling, read_volume,
                                 session_number, session_offsets)
from neuroguide.data.nsd_sessions import iter_sessions, session_trials
from neuroguide.utils.io import atomic_dir, file_fingerprint, hash_inputs, read_json, require, write_json

log = logging.getLogger("neuroguide")


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


def region_config_file(name: str) -> Path:
    from neuroguide.config import CONF_DIR

    return CONF_DIR / "region" / f"{name}.yaml"


def load_region(name: str) -> dict:
    """The region config ``conf/region/<name>.yaml`` as a plain dict (``RegionSpec.from_config`` takes it;
    baselines such as ``none`` and ``random`` have no atlas). A KeyError lists the known regions."""
    from omegaconf import OmegaConf

    f = region_config_file(str(name))
    if not f.is_file():
        known = sorted(p.stem for p in f.parent.glob("*.yaml"))
        raise KeyError(f"unknown region {name!r}: no {f}. Known regions: {known}")
    return OmegaConf.to_container(OmegaConf.load(f), resolve=True)


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


def _sessions(paths: NSDPaths, betas_format: str, max_sessions: int | None) -> list[Path]:
    sessions = paths.sessions(betas_format)
    if max_sessions:
        sessions = [p for p in sessions if session_number(p) <= int(max_sessions)]
        if not sessions:
            raise FileNotFoundError(f"data.max_sessions={max_sessions}: no betas_sessionNN.{betas_format} file with "
                                    f"NN <= {max_sessions} in {paths.betas_dir}")
    return sessions


def _params(betas_format: str, pca: bool, pca_variance: float) -> dict:
    # v2: session-number trial offsets, harmonic-mean repeats in the noise ceiling
    return {"betas_format": betas_format, "pca": bool(pca), "pca_variance": float(pca_variance), "v": 2}


def _cache_folder(cache_dir: str | Path, paths: NSDPaths, spec: RegionSpec, sessions: list[Path], params: dict) -> Path:
    return Path(cache_dir) / f"{paths.subj}_{spec.name}_{_cache_key(paths, spec, sessions, params)}"


def cached_region(root: str | Path, subject: int, region: RegionSpec | Mapping, *, cache_dir: str | Path | None,
                  betas_format: str = "nii.gz", max_sessions: int | None = None, pca: bool = False,
                  pca_variance: float = 0.95, read_workers: int | str | None = None) -> RegionData | None:
    """The region's extraction when it is already in ``cache_dir`` (same inputs and parameters), else
    None; never reads the betas (``read_workers`` is accepted, as by :func:`extract_regions`, and unused).
    Raises FileNotFoundError when the NSD files themselves are missing."""
    if cache_dir is None:
        return None
    paths = NSDPaths(root, int(subject))
    spec = region if isinstance(region, RegionSpec) else RegionSpec.from_config(region)
    sessions = _sessions(paths, betas_format, max_sessions)
    folder = _cache_folder(cache_dir, paths, spec, sessions, _params(betas_format, pca, pca_variance))
    return RegionData.load(folder) if (folder / "meta.json").exists() else None


def extract_regions(root: str | Path, subject: int, regions: Sequence[RegionSpec | Mapping], *,
                    cache_dir: str | Path | None = None, betas_format: str = "nii.gz",
                    max_sessions: int | None = None, pca: bool = False, pca_variance: float = 0.95,
                    progress: bool = True, read_workers: int | str | None = "auto") -> dict[str, RegionData]:
    """Preprocess several regions of one subject, reading each session file once.

    Steps: trial -> image mapping from the design; per session, the union of all region voxels is
    read and z-scored per voxel; repeats of each image are averaged; test split = shared images;
    optional PCA (``pca_variance`` of the variance, fitted on train only). Regions already in
    ``cache_dir`` (same inputs and parameters) are loaded as memory maps and not recomputed.
    ``read_workers`` (``data.read_workers``): processes reading the sessions, see
    :func:`neuroguide.data.nsd_sessions.read_workers`; the result does not depend on it.
    """
    paths = NSDPaths(root, int(subject))
    specs = [r if isinstance(r, RegionSpec) else RegionSpec.from_config(r) for r in regions]
    sessions = _sessions(paths, betas_format, max_sessions)
    params = _params(betas_format, pca, pca_variance)
    out: dict[str, RegionData] = {}
    todo: list[tuple[RegionSpec, Path | None]] = []
    for spec in specs:
        folder = None
        if cache_dir is not None:
            folder = _cache_folder(cache_dir, paths, spec, sessions, params)
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

    # trials per session from the headers: every trial's image is known before the betas are read, and each
    # session is folded into the per-image means as it comes (peak memory: one session, not all of them)
    counts_per_session = [session_trials(p) for p in sessions]
    offsets = session_offsets(sessions, counts_per_session)
    trials = np.concatenate([o + np.arange(n) for o, n in zip(offsets, counts_per_session)])
    n_trials = len(trials)
    image_ids = design.trial_images(paths.subject, trials)
    acc = RepeatMeans(image_ids, len(flat))
    chunks = iter_sessions(sessions, flat, shape, workers=read_workers, progress=progress,
                           desc=f"NSD {paths.subj} sessions")
    for i, chunk in enumerate(chunks):
        if len(chunk) != counts_per_session[i]:
            raise ValueError(f"{sessions[i]}: {len(chunk)} trials read, the header says {counts_per_session[i]}")
        acc.add(chunk)
    images, means, counts = acc.result()
    is_test = np.isin(images, design.shared_images)
    if not is_test.any():
        raise ValueError(f"none of the images of {paths.subj} in the {len(sessions)} sessions read is a shared "
                         "image (sharedix): there is no test split")
    ncsnr_all = read_volume(require(paths.ncsnr, "ncsnr volume")).ravel()[flat].astype(np.float32)
    n_test_rep = effective_repeats(counts[is_test])
    for (spec, folder), c in zip(todo, cols):
        rd = RegionData(
            region=spec.name, train_images=images[~is_test], train=means[np.ix_(~is_test, c)],
            test_images=images[is_test], test=means[np.ix_(is_test, c)], test_repeats=counts[is_test],
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

