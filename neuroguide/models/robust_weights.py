"""Robust ImageNet checkpoints in the MadryLab ``robustness`` format -> plain torchvision weights.

A MadryLab checkpoint is ``{"model": state_dict, "optimizer": ..., "schedule": ..., "epoch": ...}``
(sometimes ``"state_dict"``). Its state dict holds the network twice, as ``module.model.<key>``
and ``module.attacker.model.<key>`` (the attacker wraps the same network), plus the input
normalizer buffers ``module.normalizer.new_mean`` / ``new_std`` and
``module.attacker.normalize.new_mean`` / ``new_std``. :func:`convert_madrylab_state_dict` keeps one
copy of the network with torchvision's keys (``conv1.weight``, ``layer4.0.conv1.weight``, ``fc.bias``)
and drops the normalizer: in neuroguide normalization is the model's own first module
(:class:`neuroguide.models.normalize.Normalize`), so the normalizer's mean/std are checked against
it instead. Files are read with :func:`neuroguide.models.checkpoints.safe_torch_load`
(``weights_only=True``): a checkpoint holding a pickled callable is refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from neuroguide.models.checkpoints import safe_torch_load
from neuroguide.models.normalize import Normalize

# Prefixes of the network's weights, preferred first: the attacker's copy is the same network.
MODEL_PREFIXES = ("module.model.", "model.", "module.attacker.model.", "attacker.model.")
# Prefixes of the input normalizer (dropped).
NORMALIZER_PREFIXES = ("module.normalizer.", "normalizer.", "module.attacker.normalize.", "attacker.normalize.",
                       "module.attacker.normalizer.", "attacker.normalizer.")


def _state_dict_of(obj, path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object (under "model" or "state_dict", or itself)."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                return dict(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f"{path}: expected a MadryLab checkpoint {{'model': state_dict, 'epoch': ...}}, a "
                     f"{{'state_dict': ...}} or a plain state dict of tensors; found {keys}")


def convert_madrylab_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """(network state dict with torchvision keys, normalizer buffers that were dropped).

    Keys under ``module.model.`` are kept (or, when the file has only the attacker's copy, those under
    ``module.attacker.model.``); a leading ``module.`` (DataParallel) is stripped from the others.
    """
    normalizer = {k: v for k, v in sd.items() if k.startswith(NORMALIZER_PREFIXES)}
    rest = {k: v for k, v in sd.items() if k not in normalizer}
    for prefix in MODEL_PREFIXES:
        picked = {k[len(prefix):]: v for k, v in rest.items() if k.startswith(prefix)}
        if picked:
            return picked, normalizer
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in rest.items()}, normalizer


def read_robust_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read ``path`` safely and convert it: (network state dict, dropped normalizer buffers)."""
    return convert_madrylab_state_dict(_state_dict_of(safe_torch_load(path), path))


def _check_normalizer(normalizer: dict, model: nn.Module, path) -> None:
    """The checkpoint's normalizer mean/std must equal the model's Normalize (else inputs differ)."""
    norms = [m for m in model.modules() if isinstance(m, Normalize)]
    if not norms:
        return
    ours = norms[0]
    for name, buf in (("new_mean", ours.mean), ("new_std", ours.std)):
        for k, v in normalizer.items():
            if k.endswith(name) and not torch.allclose(v.detach().float().flatten().cpu(),
                                                       buf.detach().float().flatten().cpu(), atol=1e-4):
                raise ValueError(f"{path}: the checkpoint normalizes inputs with {k}={v.flatten().tolist()} but the "
                                 f"model's Normalize uses {buf.flatten().tolist()}; the weights expect other "
                                 "inputs. Build the model with that mean/std or use a checkpoint trained with "
                                 "ImageNet normalization")


def load_robust_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> dict:
    """Load a MadryLab-format (or plain) checkpoint at ``path`` into ``model`` in place.

    Args:
        model: a network whose state-dict keys are torchvision's (``NormalizedResNet``, or the
            ``root`` of a :class:`neuroguide.models.backbones.Backbone`). Its Normalize (if any) is
            compared with the checkpoint's normalizer.
    Returns:
        ``{"path", "loaded": n keys, "dropped": normalizer keys}``.
    Raises:
        ValueError naming the missing and unexpected keys (or mismatched shapes) when the weights
        do not fit ``model``.
    """
    sd, normalizer = read_robust_state_dict(path)
    _check_normalizer(normalizer, model, path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if bad_shape or (strict and (missing or unexpected)):
        raise ValueError(
            f"robust checkpoint {path} does not fit {type(model).__name__}: {len(missing)} missing keys "
            f"{missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}, {len(bad_shape)} shape mismatches "
            f"{bad_shape[:4]}. Check that backbone.name matches the checkpoint's architecture (a MadryLab ImageNet "
            "checkpoint of resnet50 needs backbone=resnet50)")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return {"path": str(path), "loaded": len(sd) - len(unexpected), "dropped": sorted(normalizer)}


def robust_weights_path(at_eps: float | None, robust_weights: Mapping | None, weights: str | None = None,
                        key: str = "paths.robust_weights") -> Path | None:
    """The checkpoint a backbone should load: ``weights`` when given, else ``robust_weights[at_eps]``.

    ``robust_weights`` maps the training epsilon to a local file (``{0: path, 2: path}``; keys may be
    ints, floats or strings). ``at_eps=None`` and no ``weights`` means random initialisation (None).
    Raises FileNotFoundError naming the config key when the file is missing or not configured.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"backbone.weights={weights} does not exist: point it at a local checkpoint "
                                    "(nothing is downloaded)")
        return path
    if at_eps is None:
        return None
    table = {float(k): v for k, v in dict(robust_weights or {}).items()}
    path = table.get(float(at_eps))
    if path is None:
        raise FileNotFoundError(
            f"backbone.at_eps={at_eps} needs a robust ImageNet checkpoint, but {key} has none for eps {at_eps} "
            f"(it has {sorted(table)}). Download one (e.g. the MadryLab robustness ImageNet L2 models) and set "
            f"{key}={{{at_eps}: /path/to/checkpoint.pt}} (command line: +{key}.{at_eps}=/path/to/checkpoint.pt), or "
            "set backbone.weights, or backbone.at_eps=null for a randomly initialised backbone")
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}[{at_eps}]={path} does not exist: fix the path (nothing is downloaded)")
    return path
