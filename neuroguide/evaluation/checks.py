"""Checks shared by the analyses, each raising an error that names what is wrong and the fix: class labels for
images, one input size for the models an analysis compares, and a name that is safe as a file name or key part."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def check_labels(images: torch.Tensor, labels: torch.Tensor, name: str = "labels") -> torch.Tensor:
    """(N,) integer labels for (N, 3, H, W) images, or a ValueError saying what is wrong."""
    if images.ndim != 4:
        raise ValueError(f"images: expected (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{name}: expected ({images.shape[0]},) class indices, one per image; got shape "
                         f"{tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name}: expected integer class indices, got dtype {labels.dtype}")
    if (labels < 0).any():
        raise ValueError(f"{name}: class indices must be >= 0, found {int(labels.min())}")
    return labels.long().cpu()


def declared_input_size(model: nn.Module) -> int | None:
    """The input size a model declares: ``neuroguide_info["facts"]["image_size"]`` (set by
    ``neuroguide.load_model``) or an ``image_size`` / ``input_size`` attribute; None if it declares none."""
    info = getattr(model, "neuroguide_info", None) or {}
    size = (info.get("facts") or {}).get("image_size")
    for attr in ("image_size", "input_size"):
        if size is None:
            size = getattr(model, attr, None)
    if isinstance(size, (tuple, list)):
        size = size[-1]
    return int(size) if size is not None else None


def check_input_sizes(models: Mapping[str, nn.Module], images: torch.Tensor,
                      input_sizes: Mapping[str, int] | None = None, analysis: str = "transfer") -> None:
    """One input size for all models compared by ``analysis`` (a transfer matrix, perturbation subspaces),
    equal to the images' size; else ValueError."""
    sizes = {}
    for name, m in models.items():
        s = (input_sizes or {}).get(name, declared_input_size(m))
        if s is not None:
            sizes[name] = int(s)
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{n!r}: {s} px" for n, s in sizes.items())
        raise ValueError(f"{analysis} needs models with one input size, but they differ ({listing}). A pixel-space "
                         "perturbation made at one size does not apply at another: evaluate models of one input size "
                         "together, or wrap a model with a resize to the common size and pass input_sizes={...}")
    h = images.shape[-1]
    for name, s in sizes.items():
        if s != h:
            raise ValueError(f"model {name!r} takes {s} px images but the images are {h} px: resize the images to "
                             f"{s} px (or pass input_sizes={{{name!r}: size}} if the model resizes its input itself)")


def safe_name(name: str) -> str:
    """``name`` with ``/`` replaced by ``_`` (a model or run name as one part of a metric key or a file name)."""
    return str(name).replace("/", "_")


# Every attack radius of conf/eval/*.yaml: analysis -> (key in its section, the norm: a fixed one, or "@<key>" for the
# section's norm key). :func:`check_eval_eps` checks them all before any model is loaded; tests/test_eps_units.py
# checks that every key of conf/eval/*.yaml whose name holds "eps" is listed here or in NOT_RADII.
EPS_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "robustness": (("eps_l2", "l2"), ("eps_linf", "linf")),
    "sensitivity": (("eps_list", "@norm"),),
    "population": (("eps_list", "@norm"),),
    "control": (("eps_l2", "l2"), ("eps_linf", "linf"), ("category_flip.eps_list", "@category_flip.norm"),
                ("superstimulus.eps", "@superstimulus.norm")),
    "transfer": (("eps", "@norm"), ("effect.eps_max", "@effect.norm")),
    "smoothness": (("eps", "@norm"),),
    "selection": (("brain_eps", "@brain_norm"),),
}
# eps keys that are no attack radius: selection.eps names the AT eps of robust checkpoints (keys of robust_weights)
NOT_RADII = ("selection.eps",)


def _get(section: Mapping, dotted: str):
    node = section
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def check_eval_eps(analyses: Mapping[str, Mapping]) -> None:
    """Check the units of every eps of the chosen analyses (``{name: cfg.eval.<name>}``) with
    :func:`neuroguide.evaluation.plots.check_eps_list` (a Linf eps >= 1 refused, naming the key and ``8/255``; a
    k/255 value as an L2 eps warned about). Unset keys (null, ``auto``, an empty list) are left to the analyses."""
    from neuroguide.evaluation.plots import check_eps_list

    for analysis, section in analyses.items():
        for key, norm_spec in EPS_KEYS.get(analysis, ()):
            value = _get(section or {}, key)
            if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
                continue
            if not isinstance(value, (str, int, float)) and len(list(value)) == 0:
                continue
            norm = _get(section, norm_spec[1:]) if norm_spec.startswith("@") else norm_spec
            check_eps_list(value, f"eval.{analysis}.{key}", norm=str(norm or "l2"))
