"""Evaluation stimuli of a model, found from the config stored in its checkpoint.

Each task knows where its held-out images are: a predictor's NSD test (shared) images, a guided
classifier's validation images with labels, an IT model's test images. :func:`model_stimuli` returns
them as a :class:`Stimuli` (images (N, 3, S, S) in [0, 1], labels (N,) or None, and the region's
responses (N, V) when there are any), taking ``n`` images spread evenly over the split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch


@dataclass
class Stimuli:
    images: torch.Tensor  # (N, 3, S, S) in [0, 1]
    labels: torch.Tensor | None = None  # (N,) class indices
    responses: torch.Tensor | None = None  # (N, V) measured responses (NSD voxels, IT sites)
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)


def _spread(n_total: int, n: int | None) -> np.ndarray:
    if not n or n >= n_total:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(int))


def _get(d: Mapping, path: str, default=None):
    for k in path.split("."):
        if not isinstance(d, Mapping) or k not in d:
            return default
        d = d[k]
    return d


def nsd_stimuli(run_config: Mapping, model_config: Mapping, n: int | None, override: Mapping) -> Stimuli:
    """The NSD test images of the predictor's region and subject, with the measured responses."""
    from neuroguide.data.nsd import NSDPaths, NSDStimuli, extract_regions

    root = override.get("nsd_root") or _get(run_config, "data.nsd_root")
    subject = int(model_config.get("subject") or _get(run_config, "subject", 1))
    region = dict(_get(run_config, "region") or {})
    rd = extract_regions(root, subject, [region], cache_dir=_get(run_config, "paths.cache_dir"),
                         betas_format=_get(run_config, "data.betas_format", "nii.gz"),
                         max_sessions=_get(run_config, "data.max_sessions"), progress=False)[region["name"]]
    rows = _spread(len(rd.test_images), n)
    size = int(override.get("image_size") or model_config.get("image_size") or _get(run_config, "data.image_size", 224))
    ds = NSDStimuli(NSDPaths(root, subject).stimuli, np.asarray(rd.test_images)[rows], size)
    images = torch.stack([ds[i] for i in range(len(ds))])
    return Stimuli(images, None, torch.as_tensor(np.asarray(rd.test)[rows]), f"NSD subj{subject:02d} {region['name']} test")


def classification_stimuli(run_config: Mapping, model_config: Mapping, n: int | None, override: Mapping) -> Stimuli:
    """Validation images and labels of the classifier's dataset (the model's own class list)."""
    from neuroguide.data.imagenet import ClassificationDataModule

    dm = ClassificationDataModule(
        root=override.get("root") or _get(run_config, "data.classification_root"),
        class_list=override.get("class_list") or _get(run_config, "data.classification_class_list"),
        dataset=override.get("dataset") or _get(run_config, "data.classification", "imagenet_subset"),
        image_size=int(override.get("image_size") or model_config.get("image_size") or 224), batch_size=64)
    dm.setup("validate")
    ds = dm.val_set
    rows = _spread(len(ds), n)
    items = [ds[int(i)] for i in rows]
    images = torch.stack([x for x, _ in items])
    labels = torch.as_tensor([int(y) for _, y in items])
    return Stimuli(images, labels, None, f"{dm.__class__.__name__} val")


def it_stimuli(run_config: Mapping, model_config: Mapping, n: int | None, override: Mapping) -> Stimuli:
    """The IT test images with the recorded (repeat-averaged) responses."""
    from neuroguide.data.it import eval_stimuli

    images, responses = eval_stimuli(run_config, model_config, n, override)
    return Stimuli(images, None, responses, "IT test")


STIMULI: dict[str, Callable[..., Stimuli]] = {
    "predictor": nsd_stimuli,
    "guidance": classification_stimuli,
    "it_encoding": it_stimuli,
}


def model_stimuli(model: torch.nn.Module, n: int | None = None, override: Mapping | None = None) -> Stimuli:
    """Stimuli for a model returned by ``neuroguide.load_model`` (uses ``model.neuroguide_info``)."""
    info = getattr(model, "neuroguide_info", None)
    if not info:
        raise ValueError("the model carries no neuroguide_info: load it with neuroguide.load_model(path)")
    task = info["task_name"]
    if task not in STIMULI:
        raise KeyError(f"no evaluation stimuli known for task {task!r}; known: {sorted(STIMULI)}")
    return STIMULI[task](info["run_config"], info["model_config"], n, dict(override or {}))
