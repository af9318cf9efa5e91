"""Where a closed-loop experiment keeps its days, what defines it, and where each day's clean images come from.

Folder ``out_dir``::

    day_000/config.json     the experiment's configuration (``loop``) that made this day
    day_000/model.pt        the model of IT that made the day's attacks (day 0: the backbone + a random readout)
    day_000/stimuli.h5      propose: clean, attacked and control images with their metadata
    day_000/recordings.h5   the responses to them (IT HDF5 layout; a lab's file, or the simulated brain's)
    day_001/model.pt        refit after day 0: the model refitted on days 0..0, starting from day 0's
    ...
    truth.json              simulate: the simulated brain's white-box sensitivity
    report/                 report: report.csv, summary.csv, fig5.png, metrics.json

Each file is written atomically, so a file that exists is complete: a step is done when its output
exists, and rerunning continues at the first missing output.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from neuroguide.data.synthetic.nsd import render_images
from neuroguide.utils.io import read_json, write_json
from neuroguide.utils.seeding import derive_seed

CONFIG = "config.json"


def day_dir(out_dir: str | Path, day: int) -> Path:
    return Path(out_dir) / f"day_{int(day):03d}"


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_day_config(folder: Path, loop: dict, create: bool = False) -> None:
    """Check that ``folder`` was made with the same ``loop`` (a ValueError naming each differing key,
    ``loop.<key>``: stored vs now, and the fix otherwise); with ``create``, write ``folder/config.json`` first if
    it is missing (a step does so just before it writes the day's first output, so a step that fails early
    leaves nothing that would hold a later, corrected command to the failed one's configuration)."""
    path = folder / CONFIG
    now = json.loads(json.dumps(loop))
    if not path.is_file():
        if create:
            write_json(path, now)
        return
    stored = read_json(path)
    if stored == now:
        return
    a, b = _flat(stored), _flat(now)
    diff = [f"loop.{k}: {a.get(k, '<absent>')!r} there, {b.get(k, '<absent>')!r} now"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    raise ValueError(f"{folder} was made with a different configuration ({'; '.join(diff[:8])}"
                     f"{'; ...' if len(diff) > 8 else ''}). Rerun with the settings stored in {path}, or start a new "
                     f"experiment with another out_dir")


def _pool(path: str) -> tuple[h5py.File, np.ndarray, np.ndarray | None]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"loop.pool_file={p} does not exist: give an HDF5 file with images (N, S, S, 3) uint8 "
                                "and image_ids (N,) (optional labels (N,)), or null to render synthetic images")
    f = h5py.File(p, "r")
    for k in ("images", "image_ids"):
        if k not in f:
            raise KeyError(f"loop.pool_file={p} lacks dataset {k!r}; found {sorted(f)}")
    ids = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in f["image_ids"][()]])
    labels = f["labels"][()] if "labels" in f else None
    return f, ids, labels


def day_images(loop: dict, day: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Day ``day``'s new clean images (N, S, S, 3) uint8, their ids, and for each one another image (N, S, S, 3)
    uint8 to interpolate towards (of another class when the pool has ``labels``).

    With ``loop.pool_file`` null the images are rendered scenes (seeded by ``loop.seed`` and the day);
    otherwise day ``t`` takes rows ``t N .. (t + 1) N - 1`` of a seeded permutation of the pool, so no image
    is used on two days.
    """
    n, size, seed = int(loop["images_per_day"]), int(loop["image_size"]), int(loop["seed"])
    rng = np.random.default_rng(derive_seed(seed, int(day), 11))
    if not loop.get("pool_file"):
        images = render_images(n, size, rng)
        others = render_images(n, size, rng)
        return images, [f"day{day:03d}_clean{j:04d}" for j in range(n)], others
    f, ids, labels = _pool(loop["pool_file"])
    with f:
        total = len(ids)
        order = np.random.default_rng(derive_seed(seed, 13)).permutation(total)
        if (day + 1) * n > total:
            raise ValueError(f"loop.pool_file={loop['pool_file']} holds {total} images: too few for day {day} with "
                             f"loop.images_per_day={n} (needs {(day + 1) * n}); add images or use fewer per day")
        rows = order[day * n:(day + 1) * n]
        other = np.empty(n, dtype=int)
        for j, r in enumerate(rows):
            pick = np.flatnonzero(labels != labels[r]) if labels is not None else np.delete(np.arange(total), r)
            other[j] = rng.choice(pick)
        images, others = _rows(f["images"], rows), _rows(f["images"], other)
        if images.shape[1:] != (size, size, 3):
            raise ValueError(f"loop.pool_file images are {images.shape[1:]}, but loop.image_size={size}: set "
                             f"loop.image_size={images.shape[1]} (the model sees the images as stored)")
        return images, [str(i) for i in ids[rows]], others


def _rows(dataset, rows: np.ndarray) -> np.ndarray:
    """``dataset[rows]`` for any rows (h5py reads increasing, unique indices only)."""
    uniq, inverse = np.unique(rows, return_inverse=True)
    return dataset[uniq][inverse]
