"""A small, seeded IT recordings file in the real format, recorded from a known simulated brain.

The "teacher" is a :class:`neuroguide.closed_loop.brain.SimulatedBrain` (one teacher for the IT task's
data and the closed loop): a randomly initialised torchvision ResNet (``teacher_arch``, seeded) cut at
``teacher_layer``, with a factorized readout per site (a Gaussian spatial bump times sparse channel
weights), each site's standardized drive on its own baseline and gain in spikes/s. Each of
``n_repeats`` presentations adds Gaussian noise with sd ``noise_ratio`` x gain (jittered per site),
and a fraction ``missing_fraction`` of the repeats is NaN (never all repeats of an image and site).
So the best possible model is known: the teacher.

Written files (in ``root``):

- ``it.h5``: ``images`` (N, S, S, 3) uint8, ``responses`` (N, sites, repeats) float32,
  ``site_ids``, ``image_ids``, attributes ``time_window_ms``, ``response_unit`` and
  ``synthetic_params``; group ``ground_truth`` with ``drive`` (N, sites) (noise-free rates),
  ``spatial`` (sites, h, w), ``features`` (sites, C), ``noise_sd`` (sites,) and attributes
  ``teacher_arch``, ``teacher_layer``, ``teacher_weights`` (file name) and ``brain_config`` (JSON:
  ``neuroguide.closed_loop.brain.brain_from_config(json.loads(...))`` rebuilds the teacher).
- ``teacher_<arch>.pt``: the teacher network's weights in the MadryLab robust-checkpoint format
  (``{"model": {"module.model.*", "module.attacker.model.*", normalizer buffers}, "epoch": 0}``), so
  a student backbone can load the teacher's trunk through the robust-weights loader.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import torch

from neuroguide.closed_loop.brain import SimulatedBrain
from neuroguide.data.synthetic.nsd import render_images
from neuroguide.models.normalize import IMAGENET_MEAN, IMAGENET_STD
from neuroguide.utils.io import atomic_path
from neuroguide.utils.seeding import derive_seed

log = logging.getLogger(__name__)

FILE = "it.h5"
WRITER_VERSION = 2  # part of the parameters: a changed writer rewrites existing files


def madrylab_checkpoint(state_dict: dict[str, torch.Tensor], epoch: int = 0) -> dict:
    """A torchvision state dict as MadryLab's ``robustness`` library saves it (two network copies and
    the normalizer buffers under ``module.``)."""
    sd = {}
    for k, v in state_dict.items():
        sd[f"module.model.{k}"] = v.detach().clone()
    for k, v in state_dict.items():
        sd[f"module.attacker.model.{k}"] = v.detach().clone()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for prefix in ("module.normalizer.", "module.attacker.normalize."):
        sd[prefix + "new_mean"], sd[prefix + "new_std"] = mean.clone(), std.clone()
    return {"model": sd, "epoch": int(epoch)}


def write_synthetic_it(root: str | Path, seed: int = 0, n_images: int = 300, n_sites: int = 12, n_repeats: int = 4,
                       image_size: int = 32, teacher_arch: str = "resnet18", teacher_layer: str = "layer2.1",
                       active_channels: int = 8, noise_ratio: float = 1.0, missing_fraction: float = 0.1) -> Path:
    """Write ``root/it.h5`` (and the teacher's weights) unless it exists with the same parameters.

    Returns the path of the HDF5 file. Writes are atomic, so concurrent callers end with one valid file.
    """
    params = dict(seed=int(seed), n_images=int(n_images), n_sites=int(n_sites), n_repeats=int(n_repeats),
                  image_size=int(image_size), teacher_arch=str(teacher_arch), teacher_layer=str(teacher_layer),
                  active_channels=int(active_channels), noise_ratio=float(noise_ratio),
                  missing_fraction=float(missing_fraction), writer_version=WRITER_VERSION)
    root = Path(root).expanduser()
    path, weights = root / FILE, root / f"teacher_{teacher_arch}.pt"
    if path.is_file() and weights.is_file():
        try:
            with h5py.File(path, "r") as f:
                if json.loads(f.attrs.get("synthetic_params", "{}")) == params:
                    return path
        except OSError:  # unreadable: rewrite it
            pass
    if n_repeats < 2:
        raise ValueError(f"n_repeats={n_repeats}: at least 2 repeats are needed for a split-half noise ceiling")
    log.info("writing the synthetic IT recordings to %s (first use)", path)
    rng = np.random.default_rng(seed)
    images = render_images(int(n_images), int(image_size), rng)
    brain = SimulatedBrain(seed=seed, arch=teacher_arch, layer=teacher_layer, n_sites=n_sites,
                           image_size=image_size, active_channels=active_channels, noise_ratio=noise_ratio)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    rates = brain.rates(x).numpy()  # (N, sites) noise-free responses, spikes/s
    noise = torch.Generator().manual_seed(derive_seed(int(seed), 3))
    responses = brain.record(x, int(n_repeats), generator=noise, missing_fraction=float(missing_fraction)).numpy()
    teacher = brain.trunk
    spatial, features = brain.readout.spatial.numpy(), brain.readout.features.numpy()
    noise_sd = brain.noise_sd.numpy()

    with atomic_path(weights) as tmp:
        torch.save(madrylab_checkpoint(teacher.root.state_dict()), tmp)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images", data=images, chunks=(1, *images.shape[1:]))
            f.create_dataset("responses", data=responses.astype(np.float32))
            f.create_dataset("site_ids", data=np.array([f"site{n:03d}" for n in range(n_sites)], dtype="S"))
            f.create_dataset("image_ids", data=np.array([f"img{i:05d}" for i in range(n_images)], dtype="S"))
            f.attrs["time_window_ms"] = np.array([70, 170])
            f.attrs["response_unit"] = "spikes/s"
            f.attrs["synthetic_params"] = json.dumps(params)
            g = f.create_group("ground_truth")
            g.create_dataset("drive", data=rates.astype(np.float32))
            g.create_dataset("spatial", data=spatial)
            g.create_dataset("features", data=features)
            g.create_dataset("noise_sd", data=noise_sd.astype(np.float32))
            g.attrs.update({"teacher_arch": teacher_arch, "teacher_layer": teacher_layer,
                            "teacher_weights": weights.name, "brain_config": json.dumps(brain.config)})
    return path
