"""A day's recorded responses to its proposed stimuli, in the IT HDF5 layout (:mod:`neuroguide.data.it`).

A lab records the images of ``day_XXX/stimuli.h5`` and writes an IT file (``images``, ``responses``
(N, sites, repeats) with NaN for a missing repeat, ``site_ids``, ``image_ids``) holding those image ids;
:func:`aligned_responses` checks it against the proposals (same ids, same sites, same pixels, no site
without any response) and returns the responses in the proposals' order. The simulated brain's
recordings are written by :func:`write_recordings` in the same layout.
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from neuroguide.data.it import read_it
from neuroguide.utils.io import atomic_path


def _named(ids, n: int = 10) -> str:
    ids = list(ids)
    return ", ".join(ids[:n]) + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def aligned_responses(path: str | os.PathLike, stimuli: dict, site_ids: list[str],
                      allow_empty_sites: bool = False) -> np.ndarray:
    """(M, sites, repeats) float32 responses of ``path`` in the order of ``stimuli["image_ids"]`` and ``site_ids``.

    Raises a ValueError naming the file and the fix when proposed images were not recorded (naming the
    missing ids), when it holds images that were not proposed, when a site is missing, when the pixels of an
    id differ from the proposed image, or when a site has no response at all (only NaN repeats), unless
    ``allow_empty_sites`` (its lower bound is then NaN). An image without any response stays a NaN row (with a
    warning): every proposal keeps its place. Messages name the file by closed_loop.py's key, ``recordings=``.
    """
    rec = read_it(path, key="recordings", unrecorded="keep")
    proposed = list(stimuli["image_ids"])
    index = {i: r for r, i in enumerate(rec.image_ids)}
    missing = [i for i in proposed if i not in index]
    if missing:
        raise ValueError(f"recordings {path} lack {len(missing)} of the day's {len(proposed)} proposed images: "
                         f"missing image ids {_named(missing)}. Record every image of the day's stimuli.h5 (same "
                         "image_ids), or pass the recordings file of this day")
    extra = sorted(set(rec.image_ids) - set(proposed))
    if extra:
        raise ValueError(f"recordings {path} hold {len(extra)} image ids that this day did not propose: {_named(extra)}"
                         ". Is it another day's file? Give the recordings of exactly this day's stimuli.h5")
    sidx = {s: k for k, s in enumerate(rec.site_ids)}
    lost = [s for s in site_ids if s not in sidx]
    if lost:
        raise ValueError(f"recordings {path} lack site(s) {_named(lost)}; the experiment's sites are "
                         f"{_named(site_ids)} (found {_named(rec.site_ids)}). Keep the site ids of day 0")
    rows = np.array([index[i] for i in proposed])
    with h5py.File(path, "r") as f:
        recorded = f["images"][()]
    if recorded.shape[1:] != stimuli["images"].shape[1:]:
        raise ValueError(f"recordings {path}: images are {recorded.shape[1:]}, the proposals "
                         f"{stimuli['images'].shape[1:]}; store the images as proposed")
    differ = np.flatnonzero((recorded[rows] != stimuli["images"]).reshape(len(rows), -1).any(1))
    if len(differ):
        raise ValueError(f"recordings {path}: the pixels of image ids {_named(np.array(proposed)[differ])} differ from "
                         "the proposed images; record (and store) the images of stimuli.h5 unchanged")
    resp = rec.responses[rows][:, [sidx[s] for s in site_ids]]
    empty = [s for k, s in enumerate(site_ids) if np.isnan(resp[:, k]).all()]
    if empty and not allow_empty_sites:
        raise ValueError(f"recordings {path}: site(s) {_named(empty)} have only NaN repeats (no response to any image "
                         "of the day). Check the recording, or run with allow_empty_sites=true to go on without "
                         "them for this day (their lower bound is NaN)")
    return resp


def write_recordings(path: str | os.PathLike, images: np.ndarray, image_ids, site_ids, responses: np.ndarray,
                     rates: np.ndarray | None = None, attrs: dict | None = None) -> Path:
    """An IT file (atomically): ``images`` (M, S, S, 3) uint8, ``responses`` (M, sites, repeats) float32,
    ``site_ids``, ``image_ids``; with ``rates`` (M, sites) the noise-free responses under ``ground_truth/rates``."""
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images", data=images)
            f.create_dataset("responses", data=np.asarray(responses, np.float32))
            f.create_dataset("site_ids", data=np.array(list(site_ids), dtype="S"))
            f.create_dataset("image_ids", data=np.array(list(image_ids), dtype="S"))
            f.attrs["time_window_ms"] = np.array([70, 170])
            f.attrs["response_unit"] = "spikes/s"
            f.attrs.update(attrs or {})
            if rates is not None:
                f.create_group("ground_truth").create_dataset("rates", data=np.asarray(rates, np.float32))
    return Path(path)


def noise_free_rates(path: str | os.PathLike) -> np.ndarray | None:
    """``ground_truth/rates`` (M, sites) of a simulated recording, None for a lab's file."""
    with h5py.File(path, "r") as f:
        return f["ground_truth/rates"][()] if "ground_truth/rates" in f else None
