"""A small, seeded NSD tree in exactly the real layout, with planted structure.

Written files (relative to ``root``; the real readers in :mod:`neuroguide.data.nsd` read them):

- ``nsddata/experiments/nsd/nsd_expdesign.mat``: ``masterordering`` (1, T) 1-based into the
  subject's image list, ``subjectim`` (8, n_subject_images) 1-based stimulus ids, ``sharedix``
  (1, n_shared) 1-based stimulus ids shown to every subject.
- ``nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5``: ``imgBrick`` (n_stimuli, S, S, 3) uint8.
- ``nsddata_betas/ppdata/subjXX/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_sessionNN.nii.gz``
  (X, Y, Z, trials) int16 = percent signal change x 300, and the same as ``.hdf5`` (dataset
  ``betas``, axes reversed: trials, Z, Y, X); ``ncsnr.nii.gz`` (X, Y, Z) float32.
- ``nsddata/ppdata/subjXX/func1pt8mm/roi/<atlas>.nii.gz`` for Kastner2015, nsdgeneral,
  prf-visualrois, streams, floc-faces, floc-bodies, floc-places (0 unlabeled, -1 outside brain).

Planted structure: every voxel of a labelled area responds to a fixed, area-specific function
of the image (a random mix of pixel statistics: quadrant colour means, contrast and edge
energy at two scales) plus Gaussian noise with ``noise_sd``; each subject image is shown
``n_repeats`` times; each session adds its own per-voxel offset and gain (which per-session
z-scoring removes). ``ncsnr`` is the planted signal sd over noise sd.

``planted="depth"`` (:mod:`neuroguide.data.synthetic.planted_depth`): each area reads instead the
features of one depth of a fixed, seeded random ResNet-18 (early areas shallow, TO and the category
areas deep), saved as ``planted_network.pt`` in the tree, so encoding models have a known best layer.
"""
from __future__ import annotations

import logging
import shutil
import zlib
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import scipy.io

from neuroguide.utils.io import atomic_dir, atomic_path, hash_inputs, marker_holds, read_json, write_json

log = logging.getLogger(__name__)

# Atlas label layout of the synthetic volume: (atlas, label) -> block index in a grid of blocks.
KASTNER_LABELS = list(range(1, 18))
FLOC = {"floc-faces": [1, 2, 3, 4, 5], "floc-bodies": [1, 2, 3, 4], "floc-places": [1, 2, 3]}
VOLUME = (18, 20, 14)  # X, Y, Z (real: 81, 104, 83 at 1.8 mm)
MARKER = "_SUCCESS.json"


def subject_dir(root: Path, subject: int) -> Path:
    return Path(root) / "nsddata" / "ppdata" / f"subj{subject:02d}" / "func1pt8mm"


def betas_dir(root: Path, subject: int) -> Path:
    return (Path(root) / "nsddata_betas" / "ppdata" / f"subj{subject:02d}" / "func1pt8mm"
            / "betas_fithrf_GLMdenoise_RR")


def render_images(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, size, size, 3) uint8 natural-ish scenes: background, blobs, rectangles, a grating."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = np.ones((size, size, 3), np.float32) * rng.uniform(0.1, 0.9, 3)
        img += 0.15 * (yy[..., None] - 0.5) * rng.normal(size=3)  # illumination gradient
        for _ in range(rng.integers(1, 5)):
            cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.06, 0.3)
            col = rng.uniform(0, 1, 3)
            if rng.random() < 0.5:
                m = ((xx - cx) ** 2 + (yy - cy) ** 2) < r**2
            else:
                m = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r * rng.uniform(0.4, 1.0))
            img[m] = col
        if rng.random() < 0.6:  # a grating patch
            th, f = rng.uniform(0, np.pi), rng.uniform(3, 12)
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
            g = 0.5 + 0.4 * np.sin(2 * np.pi * f * (np.cos(th) * xx + np.sin(th) * yy))
            m = ((xx - cx) ** 2 + (yy - cy) ** 2) < r**2
            img[m] = img[m] * 0.3 + g[m, None] * 0.7
        img += rng.normal(0, 0.03, img.shape)
        out[i] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return out


def image_features(images: np.ndarray) -> np.ndarray:
    """(n, S, S, 3) uint8 -> (n, 30) pixel statistics that the planted voxels read out."""
    x = images.astype(np.float32) / 255.0
    n, s = x.shape[:2]
    h = s // 2
    lum = x.mean(-1)
    gy, gx = np.gradient(lum, axis=(1, 2))
    edge = np.sqrt(gx**2 + gy**2)
    coarse = lum.reshape(n, s // 4, 4, s // 4, 4).mean((2, 4))
    cgy, cgx = np.gradient(coarse, axis=(1, 2))
    feats = []
    for qy in (slice(0, h), slice(h, s)):
        for qx in (slice(0, h), slice(h, s)):
            feats.append(x[:, qy, qx].mean((1, 2)))  # 3 colour means
            feats.append(edge[:, qy, qx].mean((1, 2))[:, None])  # fine edge energy
            feats.append(lum[:, qy, qx].std((1, 2))[:, None])  # contrast
    feats.append(np.sqrt(cgx**2 + cgy**2).mean((1, 2))[:, None])  # coarse edges
    feats.append((x.max(-1) - x.min(-1)).mean((1, 2))[:, None])  # saturation
    f = np.concatenate(feats, 1)
    return f


def _block_masks(shape, n_blocks: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint voxel sets inside the brain (one per block), each a few dozen voxels."""
    X, Y, Z = shape
    inner = np.zeros(shape, bool)
    inner[1:-1, 1:-1, 1:-1] = True
    idx = np.flatnonzero(inner.ravel())
    rng.shuffle(idx)
    per = min(len(idx) // (n_blocks + 1), 600)  # areas stay a small part of a large volume, as in NSD
    return [np.sort(idx[i * per:(i + 1) * per]) for i in range(n_blocks)]


def write_synthetic_nsd(root: str | Path, *, subjects=(1,), n_stimuli: int = 900, n_subject_images: int = 700,
                        n_shared: int = 100, n_repeats: int = 3, trials_per_session: int = 300,
                        image_size: int = 64, noise_sd: float = 1.0, seed: int = 0,
                        volume: tuple = VOLUME, planted: str = "features", overwrite: bool = False) -> Path:
    """Write the synthetic NSD tree under ``root`` (idempotent; atomic rename into place).

    Returns ``root``. When a complete tree with the same parameters already exists, nothing is
    written. Sizes are small by default (900 stimuli of 64 px, 700 images x 3 repeats for each
    subject, 7 sessions of 300 trials, an 18 x 20 x 14 volume). ``planted``: ``features`` (areas read
    pixel statistics, the default) or ``depth`` (areas read a depth of a fixed random network; see the module doc).
    """
    if planted not in ("features", "depth"):
        raise ValueError(f"data.synthetic_nsd.planted={planted!r}: expected features or depth")
    root = Path(root)
    params = dict(subjects=list(subjects), n_stimuli=n_stimuli, n_subject_images=n_subject_images,
                  n_shared=n_shared, n_repeats=n_repeats, trials_per_session=trials_per_session,
                  image_size=image_size, noise_sd=noise_sd, seed=seed, volume=list(volume),
                  version=1)
    if planted != "features":  # the default keeps the key (and the trees) written before the option existed
        params["planted"] = planted
    key = hash_inputs(params)
    marker = root / MARKER
    if marker.exists() and not overwrite:
        if read_json(marker).get("key") == key:
            return root
        raise FileExistsError(
            f"{root} holds a synthetic NSD tree written with other parameters ({marker}). "
            f"Delete the folder or choose another paths.synthetic_root.")
    if overwrite and root.exists():
        shutil.rmtree(root)
    if n_subject_images * n_repeats % trials_per_session:
        raise ValueError("n_subject_images * n_repeats must be a multiple of trials_per_session")
    log.info("writing the synthetic NSD data to %s (first use)", root)
    # a concurrent writer that finished first is kept if its tree is complete
    with atomic_dir(root, complete=lambda r: marker_holds(r / MARKER, key)) as tmp:
        _write(tmp, params)
        write_json(tmp / MARKER, {"key": key, "params": params})
    return root


def _nifti(path: Path, data: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine=np.diag([1.8, 1.8, 1.8, 1.0]))
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)


def _write(root: Path, p: dict) -> None:
    rng = np.random.default_rng(p["seed"])
    S, n_stim = p["image_size"], p["n_stimuli"]
    # --- stimuli -------------------------------------------------------------------------
    images = render_images(n_stim, S, rng)
    stim_path = root / "nsddata_stimuli" / "stimuli" / "nsd" / "nsd_stimuli.hdf5"
    stim_path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(stim_path, "w") as f:
        f.create_dataset("imgBrick", data=images, chunks=(1, S, S, 3))
    feats = image_features(images)
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-8)
    depth = None
    if p.get("planted") == "depth":
        from neuroguide.data.synthetic.planted_depth import depth_features, depth_of

        depth = depth_features(images, p["seed"], root)

    # --- design --------------------------------------------------------------------------
    n_sub_img, n_shared, R = p["n_subject_images"], p["n_shared"], p["n_repeats"]
    shared = rng.choice(n_stim, n_shared, replace=False)  # 0-based stimulus ids
    rest = np.setdiff1d(np.arange(n_stim), shared)
    subjectim = np.zeros((8, n_sub_img))
    for s in range(8):
        own = rng.choice(rest, n_sub_img - n_shared, replace=False)
        subjectim[s] = np.concatenate([shared, own]) + 1  # 1-based, shared first as in NSD
    order = np.concatenate([rng.permutation(n_sub_img) for _ in range(R)])  # each image R times
    masterordering = (order + 1)[None].astype(np.float64)
    design = root / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat"
    design.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(design, {"masterordering": masterordering, "subjectim": subjectim,
                              "sharedix": (np.sort(shared) + 1)[None].astype(np.float64)})

    # --- ROIs and planted responses, per subject -------------------------------------------
    shape = tuple(p["volume"])
    n_areas = len(KASTNER_LABELS) + sum(len(v) for v in FLOC.values())
    for subject in p["subjects"]:
        srng = np.random.default_rng([p["seed"], subject])
        blocks = _block_masks(shape, n_areas, srng)
        kastner = np.zeros(int(np.prod(shape)), np.int16)
        brain = np.zeros(shape, bool)
        brain[1:-1, 1:-1, 1:-1] = True
        kastner[~brain.ravel()] = -1
        area_voxels = {}
        b = 0
        for lab in KASTNER_LABELS:
            kastner[blocks[b]] = lab
            area_voxels[("Kastner2015", lab)] = blocks[b]
            b += 1
        floc_vols = {}
        for atlas, labels in FLOC.items():
            vol = np.where(brain.ravel(), 0, -1).astype(np.int16)
            for lab in labels:
                vol[blocks[b]] = lab
                area_voxels[(atlas, lab)] = blocks[b]
                b += 1
            floc_vols[atlas] = vol
        # nsdgeneral covers every labelled area except a tenth of each (so the intersection matters)
        general = np.where(brain.ravel(), 0, -1).astype(np.int16)
        for vox in area_voxels.values():
            keep = vox[srng.random(len(vox)) > 0.1]
            general[keep] = 1
        roi = subject_dir(root, subject) / "roi"
        roi.mkdir(parents=True, exist_ok=True)
        vols = {"Kastner2015": kastner, "nsdgeneral": general, **floc_vols}
        # prf-visualrois (V1v..hV4 = 1..7) and streams (early/midventral/...): derived from Kastner
        vols["prf-visualrois"] = np.where(kastner.ravel() <= 7, kastner, 0).astype(np.int16)
        streams = np.where(brain.ravel(), 0, -1).astype(np.int16)
        streams[(kastner >= 1) & (kastner <= 6)] = 1  # early
        streams[(kastner >= 7) & (kastner <= 11)] = 5  # ventral
        streams[(kastner >= 12) & (kastner <= 15)] = 6  # lateral
        vols["streams"] = streams
        for name, v in vols.items():
            _nifti(roi / f"{name}.nii.gz", v.reshape(shape))

        # planted signal: each area reads a random mix of the features through tanh
        n_vox = int(np.prod(shape))
        signal = np.zeros((n_stim, n_vox), np.float32)
        for (atlas, lab), vox in area_voxels.items():
            arng = np.random.default_rng([p["seed"], subject, zlib.crc32(atlas.encode()), lab])
            f = feats if depth is None else depth[depth_of(atlas, lab)]
            k = f.shape[1]
            use = arng.random(k) < 0.5
            W = arng.normal(size=(k, len(vox))) * use[:, None]
            z = f @ W / np.sqrt(max(use.sum(), 1))
            sig = np.tanh(z)
            sig = (sig - sig.mean(0)) / (sig.std(0) + 1e-8)
            signal[:, vox] = sig
        signal_sd = np.where(signal.std(0) > 0, 1.0, 0.0)
        ncsnr = (signal_sd / p["noise_sd"]).astype(np.float32)
        bdir = betas_dir(root, subject)
        bdir.mkdir(parents=True, exist_ok=True)
        _nifti(bdir / "ncsnr.nii.gz", ncsnr.reshape(shape))

        stim_of_trial = (subjectim[subject - 1, order] - 1).astype(int)
        T = p["trials_per_session"]
        for sess in range(len(order) // T):
            trials = stim_of_trial[sess * T:(sess + 1) * T]
            resp = signal[trials] + srng.normal(0, p["noise_sd"], (T, n_vox)).astype(np.float32)
            offset = srng.normal(0, 2.0, n_vox)
            gain = srng.uniform(0.5, 2.0, n_vox)
            psc = (resp * gain + offset) * 0.8  # percent signal change
            data = np.clip(np.round(psc * 300), -32768, 32767).astype(np.int16)  # (T, n_vox)
            vol = data.T.reshape(*shape, T)  # (X, Y, Z, T)
            _nifti(bdir / f"betas_session{sess + 1:02d}.nii.gz", vol)
            with h5py.File(bdir / f"betas_session{sess + 1:02d}.hdf5", "w") as f:
                f.create_dataset("betas", data=np.ascontiguousarray(vol.transpose(3, 2, 1, 0)))
