"""A small, seeded ImageNet subset in exactly the real ImageFolder layout, with learnable classes.

Written files (relative to ``root``; :class:`neuroguide.data.imagenet.ClassificationDataModule`
reads them like a real copy):

- ``train/<wnid>/<wnid>_<k>.JPEG``: ``n_train`` images per class (k = 0 .. n_train - 1).
- ``val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG``: ``n_val`` images per class, named as in the
  real validation set once it is sorted into class folders.
- ``classes.txt``: the class list, one wnid per line after a ``#`` comment header; class index =
  position in this list.
- ``_SUCCESS.json``: the parameters of the tree, written last (the tree is complete when it exists).

The wnids are real ImageNet-1k wnids (:data:`WNIDS`, the first ``n_classes``), so the tree looks
like a real subset such as the ImageNet-50 list of Shao et al.

Planted structure: each class is one distinct combination of a shape (circle, square, triangle,
stripes, ring, cross), a colour (8 hues) and a texture (solid, checker, speckle), drawn at a random
position, size and rotation, with a jittered hue, saturation and brightness, on a noisy
low-saturation background with a smooth illumination gradient, a small distractor blob of random
colour in half the images, and pixel noise. Colour alone separates some classes, shape and texture
the rest, so a small CNN learns the classes in a few epochs at 32-64 px without reaching 100%
at once.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from neuroguide.utils.io import atomic_dir, hash_inputs, marker_holds, read_json, write_json

log = logging.getLogger(__name__)

MARKER = "_SUCCESS.json"
CLASS_LIST = "classes.txt"
VERSION = 1

# 100 real ImageNet-1k wnids (LOC_synset_mapping.txt order), used as folder names.
WNIDS = (
    "n01440764 n01443537 n01484850 n01491361 n01494475 n01496331 n01498041 n01514668 n01514859 n01518878 "
    "n01530575 n01531178 n01532829 n01534433 n01537544 n01558993 n01560419 n01580077 n01582220 n01592084 "
    "n01601694 n01608432 n01614925 n01616318 n01622779 n01629819 n01630670 n01631663 n01632458 n01632777 "
    "n01641577 n01644373 n01644900 n01664065 n01665541 n01667114 n01667778 n01669191 n01675722 n01677366 "
    "n01682714 n01685808 n01687978 n01688243 n01689811 n01692333 n01693334 n01694178 n01695060 n01697457 "
    "n01698640 n01704323 n01728572 n01728920 n01729322 n01729977 n01734418 n01735189 n01737021 n01739381 "
    "n01740131 n01742172 n01744401 n01748264 n01749939 n01751748 n01753488 n01755581 n01756291 n01768244 "
    "n01770081 n01770393 n01773157 n01773549 n01773797 n01774384 n01774750 n01775062 n01776313 n01784675 "
    "n01795545 n01796340 n01797886 n01798484 n01806143 n01806567 n01807496 n01817953 n01818515 n01819313 "
    "n01820546 n01824575 n01828970 n01829413 n01833805 n01843065 n01843383 n01847000 n01855032 n01855672"
).split()

SHAPES = ("circle", "square", "triangle", "stripes", "ring", "cross")
HUES = tuple(i / 8 for i in range(8))  # red, orange, yellow, green, cyan, blue, purple, magenta (HSV hue)
TEXTURES = ("solid", "checker", "speckle")


def class_recipes(n_classes: int, seed: int = 0) -> list[tuple[str, float, str]]:
    """(shape, hue, texture) of each class: ``n_classes`` distinct combinations, seeded.

    Classes come in pairs that share a hue and differ in shape and texture (classes 2j and 2j+1),
    so colour alone does not solve the task; the shapes cycle fastest, so a small subset (e.g. 4
    classes) still shows different shapes.
    """
    n_combos = len(SHAPES) * len(HUES) * len(TEXTURES)
    if n_classes > min(n_combos, len(WNIDS)):
        raise ValueError(f"n_classes={n_classes}: the synthetic ImageNet writer has at most "
                         f"{min(n_combos, len(WNIDS))} distinct classes; choose a smaller n_classes")
    rng = np.random.default_rng([seed, 7])
    shape_order, hue_order, tex_order = (rng.permutation(n) for n in (len(SHAPES), len(HUES), len(TEXTURES)))
    out, used = [], set()
    k = 0
    while len(out) < n_classes:  # skip repeated combinations; the k // 48 term breaks the period
        c = (int(shape_order[k % 6]), int(hue_order[(k // 2) % 8]), int(tex_order[(k + k // 48) % 3]))
        if c not in used:
            used.add(c)
            out.append((SHAPES[c[0]], HUES[c[1]], TEXTURES[c[2]]))
        k += 1
    return out


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` in its own coordinates (u, v), unit size, centred at 0."""
    if shape == "circle":
        return u**2 + v**2 < 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.85
    if shape == "triangle":
        s3 = np.sqrt(3.0)
        return (v < 0.5) & (s3 * u - v < 1.0) & (-s3 * u - v < 1.0)
    if shape == "stripes":  # three parallel bars
        return (np.maximum(np.abs(u), np.abs(v)) < 1.0) & (np.sin(2.5 * np.pi * (u + 1)) > 0)
    if shape == "ring":
        r2 = u**2 + v**2
        return (r2 < 1.0) & (r2 > 0.5**2)
    if shape == "cross":
        return ((np.abs(u) < 0.3) & (np.abs(v) < 1.0)) | ((np.abs(v) < 0.3) & (np.abs(u) < 1.0))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_image(recipe: tuple[str, float, str], size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of the class ``recipe`` = (shape, hue, texture)."""
    shape, hue, texture = recipe
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # [0, 1) image coordinates
    # background: low-saturation colour, smooth gradient, noise
    bg = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.25), rng.uniform(0.25, 0.85))
    grad = rng.normal(0, 0.12, 2)
    img = bg[None, None, :] + (grad[0] * (xx - 0.5) + grad[1] * (yy - 0.5))[..., None]
    img = img + rng.normal(0, 0.06, (size, size, 3)).astype(np.float32)
    # distractor: a small blob of random colour
    if rng.random() < 0.5:
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.12)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = _hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 1), rng.uniform(0.3, 1))
    # the class object
    r = rng.uniform(0.2, 0.34)  # half-size in image units
    cx, cy = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
    th = rng.uniform(0, 2 * np.pi) if shape != "stripes" else rng.uniform(-0.35, 0.35)
    dx, dy = (xx - cx) / r, (yy - cy) / r
    u, v = np.cos(th) * dx + np.sin(th) * dy, -np.sin(th) * dx + np.cos(th) * dy
    mask = _shape_mask(shape, u, v)
    colour = _hsv_to_rgb(hue + rng.normal(0, 0.02), rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0))
    if texture == "solid":
        fill = np.broadcast_to(colour, (size, size, 3))
    elif texture == "checker":
        period = rng.uniform(0.07, 0.11)
        check = ((np.floor(u * r / period) + np.floor(v * r / period)) % 2 == 0)[..., None]
        fill = np.where(check, colour, colour * 0.35)
    elif texture == "speckle":
        fill = colour * rng.uniform(0.25, 1.0, (size, size, 1)).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")
    img[mask] = fill[mask] + rng.normal(0, 0.03, (int(mask.sum()), 3))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_synthetic_imagenet(root: str | Path, *, n_classes: int = 10, n_train: int = 60, n_val: int = 20,
                             image_size: int = 64, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the synthetic ImageNet subset under ``root`` (idempotent; atomic rename into place).

    ``n_train`` and ``n_val`` are images per class. Returns ``root``. When a complete tree with
    the same parameters exists (its ``_SUCCESS.json`` matches), nothing is written. The tree is
    written into a temporary sibling folder and renamed onto ``root``; when a concurrent writer
    got there first with the same parameters, this writer's copy is discarded.
    """
    root = Path(root).expanduser()
    for name, val, lo in (("n_classes", n_classes, 1), ("n_train", n_train, 1), ("n_val", n_val, 1),
                          ("image_size", image_size, 8)):
        if int(val) < lo:
            raise ValueError(f"synthetic_imagenet.{name} must be >= {lo}; got {val}")
    params = dict(n_classes=int(n_classes), n_train=int(n_train), n_val=int(n_val), image_size=int(image_size),
                  seed=int(seed), version=VERSION)
    key = hash_inputs(params)
    if marker_holds(root / MARKER, key) and not overwrite:
        return root
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            found = read_json(root / MARKER).get("params") if (root / MARKER).exists() else "no _SUCCESS.json"
            raise FileExistsError(
                f"{root} is not empty and holds no synthetic ImageNet tree with parameters {params} "
                f"(found: {found}). Delete the folder, pass overwrite=True, or choose another paths.synthetic_root.")
        shutil.rmtree(root)
    recipes = class_recipes(params["n_classes"], params["seed"])  # checks n_classes
    log.info("writing the synthetic ImageNet subset to %s (first use)", root)
    # an empty folder (e.g. made by mkdir) is replaced; a concurrent writer's complete tree is kept
    with atomic_dir(root, complete=lambda r: marker_holds(r / MARKER, key)) as tmp:
        _write_tree(tmp, params, recipes)
        write_json(tmp / MARKER, {"key": key, "params": params})
    return root


def _write_tree(root: Path, p: dict, recipes: list) -> None:
    """Write train/, val/ and classes.txt under ``root`` (a fresh folder)."""
    from tqdm import tqdm

    wnids = WNIDS[: p["n_classes"]]
    S = p["image_size"]
    lines = [f"# synthetic ImageNet subset: {p['n_classes']} classes, {S} px, seed {p['seed']}",
             "# one wnid per line; class index = position in this list"]
    (root / CLASS_LIST).write_text("\n".join(lines + list(wnids)) + "\n")
    val_id = 0
    jobs = [(split, c, k) for split, n in (("train", p["n_train"]), ("val", p["n_val"]))
            for c in range(len(wnids)) for k in range(n)]
    for split, c, k in tqdm(jobs, desc=f"synthetic ImageNet -> {root.name}", leave=False, disable=len(jobs) < 2000):
        rng = np.random.default_rng([p["seed"], 0 if split == "train" else 1, c, k])
        folder = root / split / wnids[c]
        folder.mkdir(parents=True, exist_ok=True)
        if split == "train":
            name = f"{wnids[c]}_{k}.JPEG"
        else:
            val_id += 1
            name = f"ILSVRC2012_val_{val_id:08d}.JPEG"
        Image.fromarray(render_image(recipes[c], S, rng)).save(folder / name, format="JPEG", quality=90)
