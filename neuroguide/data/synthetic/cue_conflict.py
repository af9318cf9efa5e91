"""A synthetic cue-conflict set with a planted answer, in the layout of Geirhos et al.'s stimuli.

Each class ``k`` has a *shape cue*, a silhouette (:data:`SHAPES`: disk, square, triangle, ...) and a
*texture cue*, a periodic texture (:data:`TEXTURES`: stripes at four orientations, checkers, dots,
grid, diamonds; coarse, then fine). An image of cue pair ``(a, b)`` is the silhouette of class ``a``
filled with the texture of class ``b``, at a jittered position, size and small rotation, in random
colours on a plain background of random colour, with pixel noise. A *cue-conflict* image has
``a != b``: a model that decides ``a`` followed the shape, one that decides ``b`` the texture.

Written files (relative to ``root``; :func:`neuroguide.evaluation.analyses.shape_bias.read_cue_conflict`
reads them like the real stimuli):

- ``<class a>/<i:04d>_<class a>-<class b>.png``: ``n_per_pair`` images of every ordered pair
  ``a != b`` (the folder is the shape class, the name after the last ``-`` the texture class, as
  model-vs-human's ``0001_..._dog10-bird2.png``); PNG, so the textures are not blurred.
- ``categories.txt``: the class names, one per line in class order (``#`` comments name each class's
  shape and texture). Its presence tells the reader that the categories are the model's own classes
  (the run's class list), not the 16 ImageNet categories.
- ``_SUCCESS.json``: the parameters, written last (the set is complete when it exists).

The same renderer (:func:`render_cue_image`) draws training images for tests: shape ``y`` with a
random texture (only shape predicts the class) or texture ``y`` with a random shape.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from neuroguide.utils.io import atomic_dir, hash_inputs, marker_holds, read_json, write_json

log = logging.getLogger(__name__)

MARKER = "_SUCCESS.json"
CATEGORY_FILE = "categories.txt"
VERSION = 1

SHAPES = ("disk", "square", "triangle", "plus", "ring", "diamond", "star", "hexagon", "frame", "tee", "ell",
          "crescent", "semicircle", "hourglass", "ellipse", "x")
_KINDS = ("stripes0", "stripes45", "stripes90", "stripes135", "checker", "dots", "grid", "diamonds")
_CYCLES = {"coarse": 5.0, "fine": 9.0}  # texture periods per image width
TEXTURES = tuple(f"{k}-{f}" for f in _CYCLES for k in _KINDS)
MAX_CLASSES = min(len(SHAPES), len(TEXTURES))
_NAME = re.compile(r"^[A-Za-z0-9]+$")


def class_cues(n_classes: int) -> list[tuple[str, str]]:
    """(shape, texture) of classes 0 .. n_classes - 1: class k has ``SHAPES[k]`` and ``TEXTURES[k]``.

    All shapes differ and all textures differ; with up to 8 classes every texture is coarse.
    """
    if not 2 <= n_classes <= MAX_CLASSES:
        raise ValueError(f"the synthetic cue-conflict set needs 2 to {MAX_CLASSES} classes (one silhouette and one "
                         f"texture each); got {n_classes}. Fix: data.synthetic_imagenet.n_classes <= {MAX_CLASSES}, "
                         "or evaluate on the real stimuli (eval.shape_bias.stimuli_dir=<folder>)")
    return [(SHAPES[k], TEXTURES[k]) for k in range(n_classes)]


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` at the (H, W) local coordinates (u, v): unit half-size, centred at 0,
    v pointing down."""
    r = np.hypot(u, v)
    box = np.maximum(np.abs(u), np.abs(v))
    if shape == "disk":
        return r < 0.85
    if shape == "square":
        return box < 0.75
    if shape == "triangle":
        s3 = np.sqrt(3.0)
        return (v < 0.6) & (s3 * u - v < 1.1) & (-s3 * u - v < 1.1)
    if shape == "plus":
        return ((np.abs(u) < 0.3) & (np.abs(v) < 0.95)) | ((np.abs(v) < 0.3) & (np.abs(u) < 0.95))
    if shape == "ring":
        return (r < 0.95) & (r > 0.55)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) < 1.0
    if shape == "star":
        return r < 0.5 + 0.42 * np.cos(5 * np.arctan2(v, u) + np.pi / 2)
    if shape == "hexagon":
        return np.maximum(np.abs(u) * np.sqrt(3) / 2 + np.abs(v) / 2, np.abs(v)) < 0.82
    if shape == "frame":
        return (box < 0.95) & (box > 0.55)
    if shape == "tee":
        return ((np.abs(v + 0.65) < 0.3) & (np.abs(u) < 0.95)) | ((np.abs(u) < 0.28) & (v > -0.95) & (v < 0.95))
    if shape == "ell":
        return ((np.abs(u + 0.62) < 0.3) & (np.abs(v) < 0.95)) | ((np.abs(v - 0.65) < 0.3) & (u > -0.92) & (u < 0.9))
    if shape == "crescent":
        return (r < 0.95) & (np.hypot(u - 0.45, v) > 0.72)
    if shape == "semicircle":
        return (r < 0.95) & (v > -0.15)
    if shape == "hourglass":
        return (np.abs(u) < 0.9 * np.abs(v) + 0.08) & (np.abs(v) < 0.92)
    if shape == "ellipse":
        return u**2 + (v / 0.45) ** 2 < 0.95
    if shape == "x":
        return ((np.abs(u - v) < 0.42) | (np.abs(u + v) < 0.42)) & (box < 0.9)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def texture_pattern(texture: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean (H, W) pattern of ``texture`` ("<kind>-<coarse|fine>") at image coordinates x, y in [0, 1),
    with a random phase."""
    kind, _, scale = texture.partition("-")
    if kind not in _KINDS or scale not in _CYCLES:
        raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")
    f = _CYCLES[scale]
    px, py = rng.uniform(0, 1, 2)
    if kind.startswith("stripes"):
        a = np.deg2rad(float(kind[len("stripes"):]))
        return np.sin(2 * np.pi * (f * (x * np.cos(a) + y * np.sin(a)) + px)) > 0
    if kind == "checker":
        return np.sin(2 * np.pi * (f * x + px)) * np.sin(2 * np.pi * (f * y + py)) > 0
    if kind == "diamonds":  # a checker turned by 45 degrees
        s = f / np.sqrt(2)
        return np.sin(2 * np.pi * (s * (x + y) + px)) * np.sin(2 * np.pi * (s * (x - y) + py)) > 0
    fx, fy = (f * x + px) % 1.0 - 0.5, (f * y + py) % 1.0 - 0.5
    if kind == "dots":
        return fx**2 + fy**2 < 0.3**2
    return (np.abs(fx) < 0.14) | (np.abs(fy) < 0.14)  # grid: thin lines in both directions


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32)


def render_cue_image(shape: str, texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image: the silhouette ``shape`` filled with ``texture``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.broadcast_to(_hsv(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.35, 0.75)), (size, size, 3)).copy()
    r = rng.uniform(0.3, 0.4)  # half-size in image units
    cx, cy = rng.uniform(0.5 - (0.48 - r), 0.5 + (0.48 - r), 2)
    th = rng.uniform(-0.15, 0.15)  # small, so that a square stays a square and not a diamond
    dx, dy = (xx - cx) / r, (yy - cy) / r
    mask = shape_mask(shape, np.cos(th) * dx + np.sin(th) * dy, -np.sin(th) * dx + np.cos(th) * dy)
    hue = rng.uniform()
    light, dark = _hsv(hue, rng.uniform(0.5, 1.0), rng.uniform(0.8, 1.0)), _hsv(hue + rng.uniform(0.3, 0.7),
                                                                              rng.uniform(0.5, 1.0), rng.uniform(0.05, 0.3))
    fill = np.where(texture_pattern(texture, xx, yy, rng)[..., None], light, dark)
    img[mask] = fill[mask]
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def cue_pairs(n_classes: int, n_per_pair: int) -> list[tuple[int, int]]:
    """Every ordered pair (shape class a, texture class b), a != b, ``n_per_pair`` times, in order."""
    return [(a, b) for a in range(n_classes) for b in range(n_classes) if a != b for _ in range(n_per_pair)]


def write_cue_conflict(root: str | Path, classes: Sequence[str], *, n_per_pair: int = 4, image_size: int = 64,
                       seed: int = 0, overwrite: bool = False) -> Path:
    """Write the cue-conflict set of ``classes`` under ``root`` (idempotent; atomic rename into place).

    Args:
        classes: the class names in output order (the run's class list, e.g. the synthetic ImageNet's
            wnids); class k gets the cues of :func:`class_cues`. Letters and digits only.
        n_per_pair: images per ordered pair of different classes: ``K * (K - 1) * n_per_pair`` images.
    Returns ``root``. When a complete set with the same parameters exists, nothing is written; a
    different set there raises FileExistsError (unless ``overwrite``).
    """
    root = Path(root).expanduser()
    classes = [str(c) for c in classes]
    bad = [c for c in classes if not _NAME.match(c)]
    if bad or len(set(classes)) != len(classes):
        raise ValueError(f"cue-conflict classes {bad or classes} : expected distinct names of letters and digits "
                         "(e.g. wnids n01440764), since they become folder and file names (<shape>/<i>_<shape>-"
                         "<texture>.png). Fix the class list")
    for name, val, lo in (("n_per_pair", n_per_pair, 1), ("image_size", image_size, 16)):
        if int(val) < lo:
            raise ValueError(f"synthetic cue-conflict {name} must be >= {lo}; got {val} "
                             f"(eval.shape_bias.synthetic.{name})")
    cues = class_cues(len(classes))
    params = dict(classes=classes, n_per_pair=int(n_per_pair), image_size=int(image_size), seed=int(seed),
                  version=VERSION)
    key = hash_inputs(params)
    if marker_holds(root / MARKER, key) and not overwrite:
        return root
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            found = read_json(root / MARKER).get("params") if (root / MARKER).exists() else f"no {MARKER}"
            raise FileExistsError(
                f"{root} is not empty and holds no synthetic cue-conflict set with parameters {params} (found: "
                f"{found}). Delete the folder, or choose another eval.shape_bias.synthetic.root")
        shutil.rmtree(root)
    log.info("writing the synthetic cue-conflict set to %s (first use)", root)
    with atomic_dir(root, complete=lambda r: marker_holds(r / MARKER, key)) as tmp:
        lines = [f"# synthetic cue-conflict set: {len(classes)} classes, {image_size} px, seed {seed}",
                 "# one class per line, in the model's output order: name  # shape cue, texture cue"]
        lines += [f"{c}  # shape {s}, texture {t}" for c, (s, t) in zip(classes, cues)]
        (tmp / CATEGORY_FILE).write_text("\n".join(lines) + "\n")
        for i, (a, b) in enumerate(cue_pairs(len(classes), int(n_per_pair))):
            rng = np.random.default_rng([int(seed), 11, i])
            folder = tmp / classes[a]
            folder.mkdir(exist_ok=True)
            img = render_cue_image(cues[a][0], cues[b][1], int(image_size), rng)
            Image.fromarray(img).save(folder / f"{i:04d}_{classes[a]}-{classes[b]}.png", format="PNG")
        write_json(tmp / MARKER, {"key": key, "params": params, "cues": [list(c) for c in cues]})
    return root
