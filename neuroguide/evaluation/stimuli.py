"""Evaluation stimuli of a model, found from the config stored in its checkpoint.

Each task knows where its held-out images are: a predictor's NSD test (shared) images, a guided
classifier's test images (the val/ folder) with labels, an IT model's test images. :func:`model_stimuli` returns
them as a :class:`Stimuli` (images (N, 3, S, S) in [0, 1], labels (N,) or None, and the region's
responses (N, V) when there are any), taking ``n`` images spread evenly over the split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch


@dataclass
class Stimuli:
    images: torch.Tensor  # (N, 3, S, S) in [0, 1]
    labels: torch.Tensor | None = None  # (N,) class indices
    responses: torch.Tensor | None = None  # (N, V) measured responses (NSD voxels, IT sites)
    source: str = ""
    region: str | None = None  # whose responses these are ("IT" for IT sites)
    region_responses: dict | None = None  # {region: (N, V)} when several regions were read
    # n -> n stimuli spread over the same held-out split (None: all of it), e.g. the clean images that unit
    # sensitivity's sigma_i is the std over; set by model_stimuli
    split: Callable[[int | None], "Stimuli"] | None = field(default=None, repr=False, compare=False)

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


def nsd_stimuli(run_config: Mapping, facts: Mapping, n: int | None, override: Mapping,
                regions: list | None = None) -> Stimuli:
    """NSD test (shared) images of the run's subject with the measured responses of its region (or of
    ``regions``: region configs or names of conf/region/*.yaml), resized to the model's input size."""
    from neuroguide.data.nsd import NSDPaths
    from neuroguide.data.nsd_regions import extract_regions, load_region
    from neuroguide.data.nsd_stimuli import NSDStimuli

    root = override.get("nsd_root") or _get(run_config, "data.nsd_root")
    if not root:
        raise ValueError("no NSD data for this model: set stimuli.nsd_root=<NSD folder> (evaluate.py) to compare with regions")
    subject = int(facts.get("subject") or _get(run_config, "subject", 1))
    specs = []
    for r in regions or [dict(_get(run_config, "region") or {})]:
        if isinstance(r, str):
            r = load_region(r)
        if not r.get("atlas"):
            raise ValueError(f"region {r.get('name')!r} has no voxels (a baseline): name the regions to compare with, "
                             "e.g. eval.rsa.regions=[V1,TO]")
        specs.append(r)
    rds = extract_regions(root, subject, specs, cache_dir=_get(run_config, "paths.cache_dir"),
                          betas_format=_get(run_config, "data.betas_format", "nii.gz"),
                          max_sessions=_get(run_config, "data.max_sessions"), progress=False,
                          read_workers=_get(run_config, "data.read_workers", "auto"))
    first = rds[specs[0]["name"]]
    rows = _spread(len(first.test_images), n)
    size = int(override.get("image_size") or facts.get("image_size") or _get(run_config, "data.image_size", 224))
    ds = NSDStimuli(NSDPaths(root, subject).stimuli, np.asarray(first.test_images)[rows], size)
    images = torch.stack([ds[i] for i in range(len(ds))])
    responses = {name: torch.as_tensor(np.asarray(rd.test)[rows]) for name, rd in rds.items()}
    return Stimuli(images, None, responses[specs[0]["name"]], f"NSD subj{subject:02d} test", region=specs[0]["name"],
                   region_responses=responses)


def classification_stimuli(run_config: Mapping, facts: Mapping, n: int | None, override: Mapping) -> Stimuli:
    """Test images and labels of the classifier's dataset (the model's own class list): the ImageNet
    ``val/`` folder (CIFAR-100: its test set), held out from training and from checkpoint selection
    (the validation split is part of the train folder)."""
    from neuroguide.data.imagenet import ClassificationDataModule

    dm = ClassificationDataModule(
        root=override.get("root") or _get(run_config, "data.classification_root"),
        class_list=override.get("class_list") or _get(run_config, "data.classification_class_list"),
        dataset=override.get("dataset") or _get(run_config, "data.classification", "imagenet_subset"),
        image_size=int(override.get("image_size") or facts.get("image_size") or 224), batch_size=64)
    dm.setup("test")
    ds = dm.test_set
    rows = _spread(len(ds), n)
    items = [ds[int(i)] for i in rows]
    images = torch.stack([x for x, _ in items])
    labels = torch.as_tensor([int(y) for _, y in items])
    return Stimuli(images, labels, None, f"{dm.__class__.__name__} test")


def it_stimuli(run_config: Mapping, facts: Mapping, n: int | None, override: Mapping) -> Stimuli:
    """The IT test images (the same split by image as in training) with the recorded mean responses."""
    from neuroguide.data.it import ITDataModule

    dm_cfg = dict(_get(run_config, "task.datamodule") or {})
    path = override.get("it_file") or facts.get("it_file") or dm_cfg.get("path")
    size = int(override.get("image_size") or facts.get("image_size") or dm_cfg.get("image_size", 224))
    dm = ITDataModule(path, image_size=size, val_fraction=dm_cfg.get("val_fraction", 0.1),
                      test_fraction=dm_cfg.get("test_fraction", 0.2), seed=int(dm_cfg.get("seed", 0)))
    dm.setup("test")
    ds = dm.sets["test"]
    rows = _spread(len(ds), n)
    items = [ds[int(i)] for i in rows]
    return Stimuli(torch.stack([x for x, _ in items]), None, torch.stack([torch.as_tensor(y) for _, y in items]),
                   "IT test", region="IT")


# the held-out stimuli a kind declares (ModelKind.stimuli, neuroguide.tasks.kinds) -> its reader:
# loader(run_config, facts, n, override) -> Stimuli
LOADERS: dict[str, Callable[..., Stimuli]] = {
    "nsd": nsd_stimuli,
    "classification": classification_stimuli,
    "it": it_stimuli,
}


def stimuli_loader(model: torch.nn.Module) -> Callable[..., Stimuli]:
    """The reader of ``model``'s held-out stimuli, by its kind's ``stimuli`` (a KeyError naming the kind otherwise)."""
    from neuroguide.tasks import model_kind

    info = getattr(model, "neuroguide_info", None)
    if not info:
        raise ValueError("the model carries no neuroguide_info: load it with neuroguide.load_model(path)")
    name = info.get("model_kind") or info["task_name"]
    try:
        return LOADERS[model_kind(name).stimuli]
    except KeyError as e:
        raise KeyError(f"no evaluation stimuli known for model kind {name!r}: {e}") from None


def model_stimuli(model: torch.nn.Module, n: int | None = None, override: Mapping | None = None) -> Stimuli:
    """Stimuli for a model returned by ``neuroguide.load_model`` (uses ``model.neuroguide_info``)."""
    loader, override = stimuli_loader(model), dict(override or {})
    info = model.neuroguide_info
    run_config, facts = info["run_config"], info.get("facts") or {}
    stim = loader(run_config, facts, n, override)
    stim.split = lambda m=None: loader(run_config, facts, m, override)
    return stim


def neural_reference(model, params: dict, cfg_n: int | None) -> tuple[torch.Tensor, dict]:
    """Images and measured responses to compare a model with: NSD test images with the voxels of
    ``params['regions']`` (default: the model's own region), or an IT model's test sites."""
    info = model.neuroguide_info
    regions = params.pop("regions", None)
    n = params.pop("n_images", None) or cfg_n
    from neuroguide.models.features import device_of

    device = device_of(model)
    if stimuli_loader(model) is it_stimuli and not regions:
        st = it_stimuli(info["run_config"], info["facts"], n, {})
        return st.images.to(device), {"IT": st.responses}
    st = nsd_stimuli(info["run_config"], info["facts"], n, params.pop("stimuli", {}) or {}, regions)
    return st.images.to(device), st.region_responses
