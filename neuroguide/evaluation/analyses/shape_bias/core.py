"""Shape bias of a model: decisions on cue-conflict images, from a stimulus folder or by style transfer.

See the package docstring (:mod:`neuroguide.evaluation.analyses.shape_bias`) for the two sources and how a
model's outputs map to the decision categories.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from neuroguide.evaluation.analyses.shape_bias.imagenet16 import CATEGORIES, category_columns
from neuroguide.evaluation.analyses.shape_bias.metric import _write, shape_bias
from neuroguide.evaluation.analyses.shape_bias.stimuli import (CueConflictStimulus, folder_categories, load_images,
                                                      read_cue_conflict, resolve_stimuli_dir)

log = logging.getLogger("neuroguide")


# ----------------------------------------------------------------------------- decisions
def category_probabilities(logits: torch.Tensor, columns: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """(B, K) logits -> (B, C) mean softmax probability over each category's columns (``columns`` order)."""
    p = torch.softmax(logits.float(), dim=1)
    return torch.stack([p[:, list(cols)].mean(dim=1) for cols in columns.values()], dim=1)


def own_columns(categories: Sequence[str], classes: Sequence | None, n_outputs: int, where: str = "the stimuli"
                ) -> tuple[dict[str, list[int]], list[str]]:
    """Output columns of each category when the categories are the model's own classes (a folder with a
    ``categories.txt``, e.g. the synthetic set): column k belongs to category ``classes[k]``.

    Returns ``({category: [column, ...]}`` for the categories the model has, the unmapped categories).
    """
    if classes is None:
        raise ValueError(f"{where} name their categories in categories.txt (the classes of the run that made them), "
                         "but the model says nothing about its classes. Fix: pass classes=[class name per output] "
                         "(e.g. the run's class-list file), or set model.imagenet_classes")
    classes = [str(c) for c in classes]
    if len(classes) != n_outputs:
        raise ValueError(f"classes lists {len(classes)} classes but the model has {n_outputs} outputs: give one class "
                         "name per output, in output order")
    mapped = {c: [k for k, x in enumerate(classes) if x == c] for c in categories}
    mapped = {c: cols for c, cols in mapped.items() if cols}
    if not mapped:
        raise ValueError(f"none of the model's {n_outputs} classes (e.g. {classes[:3]}) is a category of {where} "
                         f"({list(categories)[:3]} ...): they were made for another class list. Fix: delete the "
                         "synthetic cue-conflict folder so that it is written again for this model, or pass the "
                         "right classes")
    return mapped, [c for c in categories if c not in mapped]


@torch.no_grad()
def model_decisions(model: nn.Module, stimuli: Sequence[CueConflictStimulus], classes=None, *,
                    categories: Sequence[str] | None = None, image_size: int | None = None, batch_size: int = 64,
                    progress: bool = False) -> tuple[list[str], list[str]]:
    """The model's decision on each stimulus, and the unmapped categories.

    ``categories`` None: decisions over the 16 categories, ``classes`` the ImageNet index or wnid of
    each model output (None for an ImageNet-1k model). ``categories`` given (the model's own
    classes, as a folder's ``categories.txt`` lists them): the argmax over the outputs, with
    ``classes`` the name of each output (:func:`own_columns`).
    """
    from neuroguide.models.features import device_of, evaluation_mode

    device = device_of(model)
    columns, unmapped, names = None, [], []
    decisions: list[str] = []
    with evaluation_mode(model):
        for s in tqdm(range(0, len(stimuli), batch_size), desc="cue-conflict", disable=not progress, leave=False):
            x = load_images([st.path for st in stimuli[s:s + batch_size]], image_size).to(device)
            logits = model(x)
            if columns is None:
                if categories is None:
                    columns, unmapped = category_columns(classes, n_outputs=logits.shape[1])
                else:
                    columns, unmapped = own_columns(categories, classes, logits.shape[1])
                names = list(columns)
            probs = category_probabilities(logits, columns)
            decisions += [names[i] for i in probs.argmax(dim=1).tolist()]
    return decisions, unmapped


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
    """Shape bias on a cue-conflict folder: the Geirhos et al. stimuli, or a folder with its own
    ``categories.txt`` such as the synthetic set (see the package docstring).

    Returns ``{key_prefix}``, ``{key_prefix}/<category>`` (per mapped shape category; NaN with no
    shape or texture decision), ``{key_prefix}/n_shape_decisions``, ``.../n_texture_decisions``,
    ``.../n_images`` (cue conflicts counted), ``.../n_unmapped_categories``. Writes
    ``shape_bias.csv``, ``shape_bias_decisions.csv`` and ``shape_bias.png``.
    """
    own = folder_categories(stimuli_dir)
    stimuli = read_cue_conflict(stimuli_dir, own)
    if classes is None:
        classes = model_classes(model)
    decisions, unmapped = model_decisions(model, stimuli, classes, categories=own, image_size=image_size,
                                          batch_size=batch_size, progress=progress)
    usable = [i for i, s in enumerate(stimuli) if s.shape not in unmapped and s.texture not in unmapped]
    if unmapped:
        log.warning("shape bias: the model has no class in %s; left out, with the %d images whose shape or texture is "
                    "one of them", unmapped, len(stimuli) - len(usable))
    if not usable:
        raise ValueError(f"shape bias: every cue-conflict image in {stimuli_dir} has an unmapped shape or texture "
                         f"category ({unmapped}); the model's classes cover too few of the 16 categories")
    mapped = [c for c in (own or CATEGORIES) if c not in unmapped]
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
    from neuroguide.models.features import device_of, evaluation_mode
    from neuroguide.evaluation.analyses.shape_bias.style_transfer import AdaIN, cue_conflict_from_classes

    device = device_of(model)
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
             geirhos_dir: str | os.PathLike | None = None, synthetic: Mapping | None = None,
             classes=None, image_size: int | None = None, images: torch.Tensor | None = None,
             labels: torch.Tensor | None = None, style_vgg: str | os.PathLike | None = None,
             style_decoder: str | os.PathLike | None = None, class_names: Sequence[str] | None = None,
             n_style_images: int = 256, style_alpha: float = 1.0, save_style_images: bool = False,
             batch_size: int = 64, seed: int = 0, key_prefix: str = "eval/shape_bias", progress: bool = True) -> dict:
    """Shape bias from every source configured: a cue-conflict folder (``stimuli_dir``) and/or
    style transfer from the model's own images (``images``, ``labels``, ``style_vgg``, ``style_decoder``).

    ``stimuli_dir``: a folder (the Geirhos et al. stimuli, or any folder in their layout), ``"auto"``
    (the synthetic cue-conflict set for a model trained on synthetic data, else ``geirhos_dir``),
    ``"synthetic"`` (the synthetic set, written under ``synthetic["root"]`` on first use), or None;
    see :func:`.stimuli.resolve_stimuli_dir`. ``classes``: the model's class per output (ImageNet
    index or wnid; default from the model's run).

    Keys: :func:`evaluate_folder` under ``key_prefix`` and :func:`evaluate_style_transfer` under
    ``{key_prefix}/style_transfer``.
    """
    style = style_vgg is not None or style_decoder is not None
    if stimuli_dir is None and not style:
        raise ValueError("shape bias needs a source: eval.shape_bias.stimuli_dir=<Geirhos cue-conflict folder> and/or "
                         "eval.shape_bias.style_vgg=<vgg_normalised.pth> + style_decoder=<decoder.pth> (style transfer "
                         "from the model's own validation images)")
    metrics = {}
    folder = resolve_stimuli_dir(model, stimuli_dir, geirhos_dir=geirhos_dir, synthetic=synthetic, classes=classes)
    if folder is not None:
        log.info("shape bias on the cue-conflict images in %s", folder)
        metrics.update(evaluate_folder(model, folder, out_dir, classes=classes, image_size=image_size,
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
