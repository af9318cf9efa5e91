"""Criterion C with a lab's recordings (Guo et al. appendix 6.1): the stimuli file out, the recordings back.

Step 1, ``write_brain_stimuli``: the clean images and, for every candidate (AT eps, layer), their layer-targeted
perturbations as one HDF5 file in the IT layout's image part: ``images`` (M, S, S, 3) uint8 (what a display shows:
:func:`~neuroguide.evaluation.analyses.selection.brain_transfer.layer_perturbations` makes the perturbations of the 8-bit clean
images and rounds them to 8 bits inside the budget, so the file holds exactly the images a brain callable is shown,
each within ``eps`` of its clean image as stored), ``image_ids`` (M,) (``clean/<k>`` and ``eps<at_eps>/<layer>/<k>``, k the
clean image), and per image ``at_eps`` (NaN for clean), ``layer`` ("" for clean), ``source`` (k) and
``layer_change`` (``||delta h_L||_2``; NaN for clean); attributes: the budget and ``quantized_l2_mean``, the mean L2
norm of the displayed (rounded) perturbations in [0, 1] pixel units.

Step 2, the lab records these images (any order, any extra images) into an IT file (``neuroguide.data.it``:
``images``, ``responses`` (M', sites, repeats) with NaN for missing repeats, ``site_ids``, ``image_ids``).

Step 3, ``read_brain_recordings``: the repeat means matched to the stimuli by image id, grouped as criterion C
needs them (:func:`neuroguide.evaluation.analyses.selection.brain_transfer.brain_change_rows`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np
import torch

from neuroguide.data.hdf5_images import row_norm, to_uint8
from neuroguide.utils.io import atomic_path

log = logging.getLogger("neuroguide")


def candidate_id(at_eps: float, layer: str, k: int) -> str:
    return f"eps{float(at_eps):g}/{layer}/{k:05d}"


def write_brain_stimuli(path: str | os.PathLike, images: torch.Tensor,
                        perturbed: Mapping[tuple[float, str], tuple[torch.Tensor, torch.Tensor]],
                        budget: Mapping) -> Path:
    """Write the stimuli of criterion C (see the module docstring) atomically; returns the path.

    ``images``: (N, 3, S, S) clean in [0, 1]; ``perturbed``: :func:`~neuroguide.evaluation.analyses.selection.brain_transfer.
    layer_perturbations`'s ``{(at_eps, layer): (x_adv (N, 3, S, S), layer_change (N,))}``; ``budget``: the
    perturbation settings, stored as attributes (checked when the recordings are read). A ValueError when a stored
    perturbation exceeds ``budget["eps"]`` (``budget["norm"]``, default l2): perturbations not rounded inside the
    ball (make them with ``layer_perturbations``)."""
    n = len(images)
    clean8 = to_uint8(images)
    eps, norm = budget.get("eps"), str(budget.get("norm", "l2"))
    blocks, ids, at_eps, layers, source, change, norms = [clean8], [f"clean/{k:05d}" for k in range(n)], \
        [math.nan] * n, [""] * n, list(range(n)), [math.nan] * n, []
    for (e, layer), (x_adv, lc) in perturbed.items():
        adv8 = to_uint8(x_adv)
        step = torch.from_numpy((adv8.astype(np.float64) - clean8) / 255.0)
        shown = row_norm(step, norm)
        if eps is not None and bool((shown > float(eps) + 1e-6).any()):
            raise ValueError(f"criterion C stimuli eps={e:g} {layer}: the 8-bit perturbations have {norm} norms up to "
                             f"{float(shown.max()):.4g} > the budget eps={float(eps):g}: round them inside the ball "
                             "(neuroguide.data.hdf5_images.quantize_within_ball; layer_perturbations does)")
        norms.append(row_norm(step, "l2").numpy())
        blocks.append(adv8)
        ids += [candidate_id(e, layer, k) for k in range(n)]
        at_eps += [float(e)] * n
        layers += [layer] * n
        source += list(range(n))
        change += lc.float().tolist()
    quantized = float(np.mean(np.concatenate(norms))) if norms else math.nan
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images", data=np.concatenate(blocks), chunks=(1, *clean8.shape[1:]))
            f.create_dataset("image_ids", data=np.array(ids, dtype="S"))
            f.create_dataset("at_eps", data=np.array(at_eps, np.float64))
            f.create_dataset("layer", data=np.array(layers, dtype="S"))
            f.create_dataset("source", data=np.array(source, np.int64))
            f.create_dataset("layer_change", data=np.array(change, np.float32))
            f.attrs["budget"] = json.dumps(dict(budget), sort_keys=True)
            f.attrs["quantized_l2_mean"] = quantized
    log.info("selection criterion C: wrote %d stimuli (%d clean x (1 + %d candidates)) to %s; displayed (8-bit) "
             "perturbations have mean L2 norm %.3g (budget %s). Record them and rerun with "
             "eval.selection.brain_recordings=<IT file of the recordings>", len(ids), n, len(perturbed), path,
             quantized, budget.get("eps"))
    return Path(path)


def _strings(a) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(a).ravel()]


def read_brain_recordings(stimuli: str | os.PathLike, recordings: str | os.PathLike,
                          candidates: Sequence[tuple[float, str]], budget: Mapping | None = None):
    """``(clean (N, sites), {(at_eps, layer): (N, sites)}, {(at_eps, layer): layer_change (N,)})`` repeat means of
    the lab's ``recordings`` (an IT file) for the images of the ``stimuli`` file, for each of ``candidates``.

    A ValueError names what does not fit: candidates or a ``budget`` the stimuli file was not made with (a file of
    another configuration), or stimuli image ids absent from the recordings (the first ones listed)."""
    from neuroguide.data.it import read_it

    with h5py.File(stimuli, "r") as f:
        ids = _strings(f["image_ids"][()])
        at_eps, layers = f["at_eps"][()], _strings(f["layer"][()])
        source, change = f["source"][()], f["layer_change"][()]
        made_with = json.loads(f.attrs.get("budget", "{}"))
    if budget is not None and made_with != json.loads(json.dumps(dict(budget), sort_keys=True)):
        raise ValueError(f"{stimuli} was made with the criterion C budget {made_with}, not the configured {dict(budget)}: "
                         "use the settings it was made with (eval.selection.brain_*) or write new stimuli "
                         "(eval.selection.brain_stimuli) and record those")
    have = {(float(e), L) for e, L in zip(at_eps, layers) if L}
    missing_c = [c for c in candidates if (float(c[0]), c[1]) not in have]
    if missing_c:
        raise ValueError(f"{stimuli} has no perturbations for candidates {missing_c} (it holds {sorted(have)}): it was "
                         "made with other eps or layers; write new stimuli for this configuration")
    rec = read_it(recordings, key="eval.selection.brain_recordings")
    row_of = {i: r for r, i in enumerate(rec.image_ids.tolist())}
    absent = [i for i in ids if i not in row_of]
    if absent:
        raise ValueError(f"{recordings} lacks {len(absent)} of the {len(ids)} stimuli of {stimuli}, e.g. "
                         f"{absent[:10]}: record every image of the stimuli file (image_ids must match)")
    means = torch.from_numpy(rec.mean_response(np.array([row_of[i] for i in ids])))  # (M, sites)
    is_clean = np.array([not L for L in layers])
    clean = means[torch.from_numpy(np.where(is_clean)[0])][np.argsort(source[is_clean])]
    out, lc = {}, {}
    for e, layer in candidates:
        rows = np.where((~is_clean) & (at_eps == float(e)) & (np.array(layers) == layer))[0]
        rows = rows[np.argsort(source[rows])]
        out[(float(e), layer)] = means[torch.from_numpy(rows)]
        lc[(float(e), layer)] = torch.from_numpy(change[rows])
    return clean, out, lc
