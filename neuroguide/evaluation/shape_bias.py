"""Shape bias on cue-conflict images (Geirhos et al. 2019; the model-vs-human toolbox).

A cue-conflict image has the shape of one category and the texture of another. A decision is a
*shape decision* when the model picks the shape category and a *texture decision* when it picks the
texture category (any other answer counts as neither). Images whose shape and texture categories
agree are dropped, and

    shape_bias = #shape decisions / (#shape decisions + #texture decisions)

(``ShapeBias.analysis`` in bethgelab/model-vs-human ``modelvshuman/plotting/analyses.py``). The
per-category table groups images by their shape category, as the familiar figure of Geirhos et al.
(one marker per category on an axis from "texture" (0) to "shape" (1), a line at the mean).

Two sources of cue-conflict images:

1. The standard stimulus folder of Geirhos et al.: ``<dir>/<shape category>/<name>.png`` with the
   texture category in the file name after the last ``-`` (``airplane/airplane1-bicycle2.png``;
   model-vs-human prefixes such as ``0001_..._dog10-bird2.png`` are fine). Decisions are over the 16
   categories of :mod:`neuroguide.evaluation.imagenet16`: a category's probability is the mean
   softmax probability over its ImageNet classes that the model has (all of them for an ImageNet-1k
   model, those in its subset for e.g. ImageNet-50). Categories the model has no class for are
   *unmapped*: they are left out of the decision, and images whose shape or texture category is
   unmapped are dropped (the model could never make that decision).
2. Images made from the model's own classes by style transfer (:mod:`.style_transfer`, as Shao et
   al.); the decision is the argmax over the model's classes.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from neuroguide.evaluation.imagenet16 import CATEGORIES, category_columns

log = logging.getLogger("neuroguide")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


# ----------------------------------------------------------------------------- the stimulus folder
@dataclass
class CueConflictStimulus:
    path: Path
    shape: str
    texture: str


def _match(token: str, vocabulary: Sequence[str]) -> str | None:
    """The vocabulary entry that ``token`` names, alone or followed by a running number (longest wins)."""
    hits = [c for c in vocabulary if token == c or (token.startswith(c) and token[len(c):].isdigit())]
    return max(hits, key=len) if hits else None


def parse_name(file_name: str, vocabulary: Sequence[str] = CATEGORIES) -> tuple[str | None, str | None]:
    """(shape, texture) categories named in a cue-conflict file name (None where not recognised).

    ``airplane1-bicycle2.png`` -> ("airplane", "bicycle"); ``0003_cl_dog10-bird2.png`` -> ("dog", "bird").
    """
    stem = Path(file_name).stem
    if "-" not in stem:
        return None, None
    head, tail = stem.rsplit("-", 1)
    return _match(head.rsplit("_", 1)[-1], vocabulary), _match(tail, vocabulary)


def read_cue_conflict(folder: str | os.PathLike, categories: Sequence[str] = CATEGORIES) -> list[CueConflictStimulus]:
    """The cue-conflict images of ``folder`` (``<shape>/<shape><i>-<texture><j>.png``), sorted by path."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"cue-conflict folder {folder} does not exist. Expected the Geirhos et al. stimuli "
                                "(texture-vs-shape 'style-transfer-preprocessed-512', or model-vs-human's "
                                "'cue-conflict'): one sub-folder per shape category holding e.g. "
                                "airplane/airplane1-bicycle2.png. Fix: eval.shape_bias.stimuli_dir")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise ValueError(f"cue-conflict folder {folder} has no category sub-folders; expected one per shape category "
                         f"among {list(categories)}")
    unknown = [p.name for p in subdirs if p.name not in categories]
    if unknown:
        raise ValueError(f"cue-conflict folder {folder}: sub-folders {unknown} are not cue-conflict categories. "
                         f"Expected folder names among {list(categories)} (lower case, as in the Geirhos et al. "
                         "stimuli). Fix: rename or remove them")
    out = []
    for sub in subdirs:
        for p in sorted(sub.iterdir()):
            if p.suffix.lower() not in IMAGE_EXTENSIONS or p.name.startswith("."):
                continue
            shape_tok, texture = parse_name(p.name, categories)
            if texture is None:
                raise ValueError(f"cue-conflict image {p}: cannot read the texture category from the file name. "
                                 f"Expected '<shape><i>-<texture><j>{p.suffix}' with <texture> among "
                                 f"{list(categories)} (e.g. airplane1-bicycle2.png)")
            if shape_tok is not None and shape_tok != sub.name:
                raise ValueError(f"cue-conflict image {p}: the file name says shape '{shape_tok}' but it lies in the "
                                 f"folder '{sub.name}'; the folder is the shape category. Move the file")
            out.append(CueConflictStimulus(p, sub.name, texture))
    if not out:
        raise ValueError(f"cue-conflict folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its "
                         "category sub-folders")
    return out


def load_images(paths: Sequence[Path], image_size: int | None = None) -> torch.Tensor:
    """(B, 3, S, S) float images in [0, 1] (resized to ``image_size`` when given)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor, resize

    out = []
    for p in paths:
        with Image.open(p) as im:
            x = pil_to_tensor(im.convert("RGB")).float() / 255.0
        if image_size and tuple(x.shape[-2:]) != (image_size, image_size):
            x = resize(x, [image_size, image_size], antialias=True).clamp(0, 1)
        out.append(x)
    return torch.stack(out)


# ----------------------------------------------------------------------------- decisions
def category_probabilities(logits: torch.Tensor, columns: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """(B, K) logits -> (B, C) mean softmax probability over each category's columns (``columns`` order)."""
    p = torch.softmax(logits.float(), dim=1)
    return torch.stack([p[:, list(cols)].mean(dim=1) for cols in columns.values()], dim=1)


@torch.no_grad()
def model_decisions(model: nn.Module, stimuli: Sequence[CueConflictStimulus], classes=None, *,
                    image_size: int | None = None, batch_size: int = 64, progress: bool = False
                    ) -> tuple[list[str], list[str]]:
    """The model's 16-category decision on each stimulus, and the unmapped categories.

    ``classes``: ImageNet index or wnid of each model output (None for an ImageNet-1k model).
    """
    from neuroguide.models.features import evaluation_mode

    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    columns, unmapped, names = None, [], []
    decisions: list[str] = []
    with evaluation_mode(model):
        for s in tqdm(range(0, len(stimuli), batch_size), desc="cue-conflict", disable=not progress, leave=False):
            x = load_images([st.path for st in stimuli[s:s + batch_size]], image_size).to(device)
            logits = model(x)
            if columns is None:
                columns, unmapped = category_columns(classes, n_outputs=logits.shape[1])
                names = list(columns)
            probs = category_probabilities(logits, columns)
            decisions += [names[i] for i in probs.argmax(dim=1).tolist()]
    return decisions, unmapped


# ----------------------------------------------------------------------------- the measure
@dataclass
class ShapeBiasResult:
    """Shape bias of a set of decisions, overall and per shape category."""

    shape_bias: float
    n_shape: int
    n_texture: int
    n_other: int
    n_conflict: int  # images with shape != texture that entered the count
    n_same_dropped: int  # images with shape == texture, dropped
    per_category: list[dict] = field(default_factory=list)

    def metrics(self, prefix: str) -> dict:
        m = {prefix: self.shape_bias, f"{prefix}/n_shape_decisions": self.n_shape,
             f"{prefix}/n_texture_decisions": self.n_texture, f"{prefix}/n_images": self.n_conflict}
        for row in self.per_category:
            m[f"{prefix}/{row['category']}"] = row["shape_bias"]
        return m


def _ratio(a: int, b: int) -> float:
    return a / (a + b) if a + b else float("nan")


def shape_bias(shape: Sequence, texture: Sequence, decision: Sequence, categories: Sequence | None = None
               ) -> ShapeBiasResult:
    """Shape bias of decisions on cue-conflict images (labels of any hashable type).

    Args:
        shape, texture, decision: one entry per image: its shape category, texture category, and the
            category the model chose.
        categories: order of the per-category table (default: sorted shape categories).
    """
    shape, texture, decision = list(shape), list(texture), list(decision)
    if not (len(shape) == len(texture) == len(decision)):
        raise ValueError(f"shape ({len(shape)}), texture ({len(texture)}) and decision ({len(decision)}) must have one "
                         "entry per image")
    keep = [i for i in range(len(shape)) if shape[i] != texture[i]]
    if not keep:
        raise ValueError(f"none of the {len(shape)} images is a cue conflict (shape == texture for all): "
                         "shape bias is undefined")
    is_shape = {i: decision[i] == shape[i] for i in keep}
    is_texture = {i: decision[i] == texture[i] for i in keep}
    n_s, n_t = sum(is_shape.values()), sum(is_texture.values())
    cats = list(categories) if categories is not None else sorted({shape[i] for i in keep}, key=str)
    rows = []
    for c in cats:
        idx = [i for i in keep if shape[i] == c]
        cs, ct = sum(is_shape[i] for i in idx), sum(is_texture[i] for i in idx)
        rows.append({"category": c, "n_images": len(idx), "shape_decisions": cs, "texture_decisions": ct,
                     "other_decisions": len(idx) - cs - ct, "shape_bias": _ratio(cs, ct)})
    if n_s + n_t == 0:
        log.warning("shape bias: none of %d cue-conflict decisions matched the shape or the texture: undefined", len(keep))
    return ShapeBiasResult(_ratio(n_s, n_t), n_s, n_t, len(keep) - n_s - n_t, len(keep), len(shape) - len(keep), rows)


def shape_bias_figure(result: ShapeBiasResult, path: str | os.PathLike, title: str = "") -> Path:
    """Geirhos et al.'s plot: a marker per (shape) category at its shape bias, a line at the overall value."""
    from neuroguide.evaluation.plots import plt, save_figure

    rows = [r for r in result.per_category if r["n_images"]]
    fig, ax = plt.subplots(figsize=(4.6, 0.32 * max(len(rows), 4) + 1.4))
    ys = np.arange(len(rows))
    xs = [r["shape_bias"] for r in rows]
    ax.scatter(xs, ys, marker="D", color="tab:red", zorder=3)
    if math.isfinite(result.shape_bias):
        ax.axvline(result.shape_bias, color="tab:red", lw=1.5, label=f"mean {result.shape_bias:.2f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(ys, [str(r["category"]) for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of 'shape' decisions")
    top = ax.secondary_xaxis("top", functions=(lambda v: 1 - v, lambda v: 1 - v))
    top.set_xlabel("fraction of 'texture' decisions")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def _write(result: ShapeBiasResult, per_image: list[dict], out_dir: Path, stem: str, title: str) -> None:
    from neuroguide.evaluation.plots import write_csv

    cols = ["category", "n_images", "shape_decisions", "texture_decisions", "other_decisions", "shape_bias"]
    overall = {"category": "all", "n_images": result.n_conflict, "shape_decisions": result.n_shape,
               "texture_decisions": result.n_texture, "other_decisions": result.n_other, "shape_bias": result.shape_bias}
    write_csv(out_dir / f"{stem}.csv", result.per_category + [overall], cols)
    write_csv(out_dir / f"{stem}_decisions.csv", per_image, list(per_image[0]) if per_image else ["image"])
    shape_bias_figure(result, out_dir / f"{stem}.png", title)


# ----------------------------------------------------------------------------- sources
def model_classes(model: nn.Module) -> list | None:
    """The model's classes as ImageNet indices or wnids, if it says: ``model.imagenet_classes``, or the
    class-list file of the run that trained it (``neuroguide_info.run_config.data.imagenet_class_list``)."""
    own = getattr(model, "imagenet_classes", None)
    if own is not None:
        return list(own)
    info = getattr(model, "neuroguide_info", None) or {}
    path = ((info.get("run_config") or {}).get("data") or {}).get("imagenet_class_list")
    if path and Path(str(path)).is_file():
        from neuroguide.data.imagenet import read_class_list

        return read_class_list(path)
    return None


def evaluate_folder(model: nn.Module, stimuli_dir: str | os.PathLike, out_dir: str | os.PathLike, *, classes=None,
                    image_size: int | None = None, batch_size: int = 64, key_prefix: str = "eval/shape_bias",
                    progress: bool = True) -> dict:
    """Shape bias on the Geirhos et al. cue-conflict folder (see the module docstring).

    Returns ``{key_prefix}``, ``{key_prefix}/<category>`` (per mapped shape category; NaN with no
    shape or texture decision), ``{key_prefix}/n_shape_decisions``, ``.../n_texture_decisions``,
    ``.../n_images`` (cue conflicts counted), ``.../n_unmapped_categories``. Writes
    ``shape_bias.csv``, ``shape_bias_decisions.csv`` and ``shape_bias.png``.
    """
    stimuli = read_cue_conflict(stimuli_dir)
    if classes is None:
        classes = model_classes(model)
    decisions, unmapped = model_decisions(model, stimuli, classes, image_size=image_size, batch_size=batch_size,
                                          progress=progress)
    usable = [i for i, s in enumerate(stimuli) if s.shape not in unmapped and s.texture not in unmapped]
    if unmapped:
        log.warning("shape bias: the model has no class in %s; left out, with the %d images whose shape or texture is "
                    "one of them", unmapped, len(stimuli) - len(usable))
    if not usable:
        raise ValueError(f"shape bias: every cue-conflict image in {stimuli_dir} has an unmapped shape or texture "
                         f"category ({unmapped}); the model's classes cover too few of the 16 categories")
    mapped = [c for c in CATEGORIES if c not in unmapped]
    res = shape_bias([stimuli[i].shape for i in usable], [stimuli[i].texture for i in usable],
                     [decisions[i] for i in usable], categories=mapped)
    used = set(usable)
    per_image = [{"image": str(s.path.relative_to(Path(stimuli_dir).expanduser())), "shape": s.shape,
                  "texture": s.texture, "decision": d, "used": i in used}
                 for i, (s, d) in enumerate(zip(stimuli, decisions))]
    _write(res, per_image, Path(out_dir), "shape_bias", f"shape bias {res.shape_bias:.3f} ({res.n_conflict} "
           f"cue-conflict images{', unmapped: ' + ', '.join(unmapped) if unmapped else ''})")
    m = res.metrics(key_prefix)
    m[f"{key_prefix}/n_unmapped_categories"] = len(unmapped)
    return m


def evaluate_style_transfer(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, out_dir: str | os.PathLike,
                            *, vgg_path: str | os.PathLike, decoder_path: str | os.PathLike,
                            class_names: Sequence[str] | None = None, n_images: int = 256, alpha: float = 1.0,
                            batch_size: int = 16, seed: int = 0, save_images: bool = False,
                            key_prefix: str = "eval/shape_bias/style_transfer", progress: bool = True) -> dict:
    """Shape bias on AdaIN cue-conflict images made from the model's own classes (Shao et al.).

    Args:
        images, labels: (N, 3, H, W) in [0, 1] and (N,) class indices of the model's outputs.
        vgg_path, decoder_path: the AdaIN weight files (``vgg_normalised.pth``, ``decoder.pth``).
        class_names: names of the model's classes for the table (default ``class<k>``).
    Returns:
        ``{key_prefix}``, ``{key_prefix}/<class name>`` and the counts, as :func:`evaluate_folder`.
        Writes ``shape_bias_style_transfer.{csv,png}`` and ``..._decisions.csv`` (and the images
        under ``cue_conflict/`` with ``save_images``).
    """
    from neuroguide.models.features import evaluation_mode
    from neuroguide.evaluation.style_transfer import AdaIN, cue_conflict_from_classes

    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    stylizer = AdaIN.from_files(vgg_path, decoder_path).to(device)
    cc = cue_conflict_from_classes(images, labels, lambda c, s: stylizer(c, s, alpha), n_images=n_images,
                                   batch_size=batch_size, seed=seed, progress=progress)
    out_dir = Path(out_dir)
    if save_images:
        cc.save(out_dir / "cue_conflict", class_names)
    preds = []
    with evaluation_mode(model), torch.no_grad():
        for s in range(0, len(cc), batch_size):
            preds.append(model(cc.images[s:s + batch_size].to(device)).argmax(dim=1).cpu())
    pred = torch.cat(preds)
    n_cls = int(max(labels.max(), pred.max())) + 1
    names = list(class_names) if class_names is not None else [f"class{k}" for k in range(n_cls)]
    if len(names) < n_cls:
        raise ValueError(f"class_names has {len(names)} names but labels/predictions reach class {n_cls - 1}")
    shape_l, tex_l, dec_l = ([names[int(k)] for k in t] for t in (cc.shape, cc.texture, pred))
    present = [names[k] for k in sorted(set(cc.shape.tolist()))]
    res = shape_bias(shape_l, tex_l, dec_l, categories=present)
    per_image = [{"image": i, "content_index": int(ci), "style_index": int(si), "shape": s, "texture": t,
                  "decision": d} for i, (ci, si, s, t, d) in
                 enumerate(zip(cc.content_index, cc.style_index, shape_l, tex_l, dec_l))]
    _write(res, per_image, out_dir, "shape_bias_style_transfer",
           f"shape bias (style transfer, own classes) {res.shape_bias:.3f}, {res.n_conflict} images")
    return res.metrics(key_prefix)


def evaluate(model: nn.Module, out_dir: str | os.PathLike, *, stimuli_dir: str | os.PathLike | None = None,
             classes=None, image_size: int | None = None, images: torch.Tensor | None = None,
             labels: torch.Tensor | None = None, style_vgg: str | os.PathLike | None = None,
             style_decoder: str | os.PathLike | None = None, class_names: Sequence[str] | None = None,
             n_style_images: int = 256, style_alpha: float = 1.0, save_style_images: bool = False,
             batch_size: int = 64, seed: int = 0, key_prefix: str = "eval/shape_bias", progress: bool = True) -> dict:
    """Shape bias from every source configured: the Geirhos folder (``stimuli_dir``) and/or
    style transfer from the model's own images (``images``, ``labels``, ``style_vgg``, ``style_decoder``).

    Keys: :func:`evaluate_folder` under ``key_prefix`` and :func:`evaluate_style_transfer` under
    ``{key_prefix}/style_transfer``.
    """
    style = style_vgg is not None or style_decoder is not None
    if stimuli_dir is None and not style:
        raise ValueError("shape bias needs a source: eval.shape_bias.stimuli_dir=<Geirhos cue-conflict folder> and/or "
                         "eval.shape_bias.style_vgg=<vgg_normalised.pth> + style_decoder=<decoder.pth> (style transfer "
                         "from the model's own validation images)")
    metrics = {}
    if stimuli_dir is not None:
        metrics.update(evaluate_folder(model, stimuli_dir, out_dir, classes=classes, image_size=image_size,
                                       batch_size=batch_size, key_prefix=key_prefix, progress=progress))
    if style:
        if style_vgg is None or style_decoder is None or images is None or labels is None:
            raise ValueError("style-transfer shape bias needs style_vgg, style_decoder (the AdaIN weight files) and "
                             "labelled images (images, labels); got "
                             f"style_vgg={style_vgg}, style_decoder={style_decoder}, images "
                             f"{'given' if images is not None else 'None'}, labels {'given' if labels is not None else 'None'}")
        metrics.update(evaluate_style_transfer(
            model, images, labels, out_dir, vgg_path=style_vgg, decoder_path=style_decoder, class_names=class_names,
            n_images=n_style_images, alpha=style_alpha, batch_size=min(batch_size, 16), seed=seed,
            save_images=save_style_images, key_prefix=f"{key_prefix}/style_transfer", progress=progress))
    return metrics
