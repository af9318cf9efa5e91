"""A simulated brain: IT-like sites whose true response function is known and differentiable.

The brain is a fixed network unknown to any fitted model: a randomly initialised torchvision network
``arch`` (weights seeded from ``seed``, far from the seeds runs use) cut at ``layer``, read out by a
factorized readout per site (Klindt et al.: a Gaussian spatial bump times ``active_channels`` sparse
channel weights, :func:`site_readout`). Each site's drive is standardized on clean images and put on
its own response scale, in spikes/s::

    rate_i(x) = baseline_i + gain_i * (drive_i(x) - m_i) / s_i        (rectify=False)
    rate_i(x) = softplus(baseline_i + gain_i * (drive_i(x) - m_i) / s_i)   (rectify=True: rates >= 0)

with ``m_i, s_i`` the mean and std of the drive over ``n_calibration`` clean images rendered from the
brain's seed (or over the images given to :meth:`SimulatedBrain.calibrate`), ``baseline_i`` in
[20, 80] and ``gain_i`` in [10, 30] spikes/s. :meth:`SimulatedBrain.forward` is the noise-free rate,
differentiable in the image, so the sites' true white-box sensitivity is measured with the project's
attack engine (:func:`neuroguide.evaluation.analyses.sensitivity.core.unit_sensitivity` on the brain). Each recorded
repeat adds Gaussian trial-to-trial noise of sd ``noise_sd_i = noise_ratio * gain_i * U(0.7, 1.3)``
(:meth:`SimulatedBrain.record`).

Everything follows from :attr:`SimulatedBrain.config` (a small JSON-able dict; :func:`save_brain` /
:func:`load_brain`): the same config builds the same brain. The synthetic IT recordings
(:mod:`neuroguide.data.synthetic.it`) are recorded from this brain; the closed loop
(:mod:`neuroguide.closed_loop`) uses it in place of a monkey.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuroguide.data.synthetic.nsd import render_images
from neuroguide.models.backbones import Backbone
from neuroguide.models.readouts import FactorizedReadout
from neuroguide.utils.io import read_json, write_json
from neuroguide.utils.seeding import derive_seed

BRAIN_FORMAT = "neuroguide-simulated-brain-v1"


def teacher_seed(seed: int) -> int:
    """The torch seed of the brain's network weights, far from the small seeds runs use."""
    return zlib.crc32(f"neuroguide-it-teacher-{int(seed)}".encode())


def site_readout(shape: tuple[int, int, int], n_sites: int, rng: np.random.Generator,
                 active_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(spatial (n, h, w) Gaussian bumps, features (n, C) sparse normal weights) of the brain's sites."""
    c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    spatial = np.empty((n_sites, h, w))
    features = np.zeros((n_sites, c))
    for n in range(n_sites):
        cy, cx = rng.uniform(0, h - 1), rng.uniform(0, w - 1)
        sd = rng.uniform(0.5, 1.0) * max(1.0, min(h, w) / 4)
        spatial[n] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sd**2))
        idx = rng.choice(c, size=min(active_channels, c), replace=False)
        features[n, idx] = rng.normal(size=len(idx))
    return spatial.astype(np.float32), features.astype(np.float32)


class SimulatedBrain(nn.Module):
    """(B, 3, S, S) images in [0, 1] -> (B, n_sites) noise-free rates (spikes/s); see the module docstring.

    Args:
        seed: everything random (weights, readout, scales, noise levels, calibration images) derives from it.
        arch, layer: the network (a torchvision ResNet name or any :class:`Backbone` name) and its cut.
        n_sites: recorded sites. image_size: S, the input size the readout is built for.
        active_channels: channels each site reads. noise_ratio: trial noise sd in units of the site's gain.
        rectify: softplus on the rate (rates >= 0). n_calibration: clean images that standardize the drive.
    All parameters are frozen (``requires_grad=False``) and the module stays in eval mode.
    """

    def __init__(self, seed: int = 0, arch: str = "resnet18", layer: str = "layer2.1", n_sites: int = 12,
                 image_size: int = 32, active_channels: int = 8, noise_ratio: float = 1.0, rectify: bool = False,
                 n_calibration: int = 256):
        super().__init__()
        if int(n_sites) < 1 or int(image_size) < 8 or float(noise_ratio) < 0 or int(n_calibration) < 2:
            raise ValueError(f"SimulatedBrain: n_sites >= 1, image_size >= 8, noise_ratio >= 0 and n_calibration >= 2 "
                             f"expected; got n_sites={n_sites}, image_size={image_size}, noise_ratio={noise_ratio}, "
                             f"n_calibration={n_calibration}")
        self.config = dict(seed=int(seed), arch=str(arch), layer=str(layer), n_sites=int(n_sites),
                           image_size=int(image_size), active_channels=int(active_channels),
                           noise_ratio=float(noise_ratio), rectify=bool(rectify), n_calibration=int(n_calibration))
        with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
            torch.manual_seed(teacher_seed(seed))
            self.trunk = Backbone(arch, layer)
        shape = self.trunk.output_shape(int(image_size))
        rng = np.random.default_rng(derive_seed(int(seed), 1))
        spatial, features = site_readout(shape, int(n_sites), rng, int(active_channels))
        self.readout = FactorizedReadout(shape, int(n_sites), center=False)
        with torch.no_grad():
            self.readout.spatial.copy_(torch.from_numpy(spatial))
            self.readout.features.copy_(torch.from_numpy(features))
        self.register_buffer("baseline", torch.from_numpy(rng.uniform(20, 80, n_sites)).float())
        self.register_buffer("gain", torch.from_numpy(rng.uniform(10, 30, n_sites)).float())
        self.register_buffer("noise_sd", self.gain * float(noise_ratio)
                             * torch.from_numpy(rng.uniform(0.7, 1.3, n_sites)).float())
        self.register_buffer("drive_mean", torch.zeros(n_sites))
        self.register_buffer("drive_std", torch.ones(n_sites))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        cal = render_images(int(n_calibration), int(image_size), np.random.default_rng(derive_seed(int(seed), 2)))
        self.calibrate(torch.from_numpy(cal).permute(0, 3, 1, 2).float() / 255)

    # ------------------------------------------------------------------ responses
    def train(self, mode: bool = True) -> "SimulatedBrain":
        return super().train(False)  # a fixed brain: never in training mode (no batch statistics)

    @property
    def n_sites(self) -> int:
        return self.config["n_sites"]

    @property
    def site_ids(self) -> list[str]:
        return [f"site{n:03d}" for n in range(self.n_sites)]

    def drive(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, n_sites) raw readout of the network (before the response scale)."""
        return self.readout(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, n_sites) noise-free rates in spikes/s (differentiable)."""
        z = (self.drive(x) - self.drive_mean) / self.drive_std
        rate = self.baseline + self.gain * z
        return F.softplus(rate) if self.config["rectify"] else rate

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, batch_size: int = 128) -> None:
        """Standardize each site's drive over ``images`` (N, 3, S, S) in [0, 1]: mean 0, std 1."""
        d = torch.cat([self.drive(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]).double()
        self.drive_mean.copy_(d.mean(0).float())
        self.drive_std.copy_(d.std(0).clamp_min(1e-12).float())

    @torch.no_grad()
    def rates(self, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """(N, n_sites) noise-free rates of ``images`` (N, 3, S, S) in [0, 1], in batches, on the CPU."""
        dev = self.baseline.device
        return torch.cat([self(images[i:i + batch_size].to(dev).float()).cpu()
                          for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def record(self, images: torch.Tensor, repeats: int, generator: torch.Generator | None = None,
               missing_fraction: float = 0.0, batch_size: int = 128) -> torch.Tensor:
        """(N, n_sites, repeats) float32 recorded responses: noise-free rate + Gaussian trial noise.

        Args:
            images: (N, 3, S, S) in [0, 1].
            repeats: presentations of each image (>= 1).
            generator: a CPU torch.Generator for the noise (default: the global one).
            missing_fraction: each repeat is NaN with this probability (a lost trial), never all
                repeats of one (image, site).
        """
        if int(repeats) < 1:
            raise ValueError(f"record: repeats must be >= 1, got {repeats}")
        if not 0 <= float(missing_fraction) < 1:
            raise ValueError(f"record: missing_fraction must be in [0, 1), got {missing_fraction}")
        rate = self.rates(images, batch_size)  # (N, sites)
        noise = torch.randn((*rate.shape, int(repeats)), generator=generator)
        r = rate[..., None] + self.noise_sd.cpu()[None, :, None] * noise
        if missing_fraction > 0:
            missing = torch.rand(r.shape, generator=generator) < missing_fraction
            missing[..., 0] &= ~missing.all(dim=2)  # keep at least one repeat of every (image, site)
            r[missing] = float("nan")
        return r.float()


# ---------------------------------------------------------------------- config files
def brain_from_config(config: dict) -> SimulatedBrain:
    """The brain a :attr:`SimulatedBrain.config` dict describes; unknown keys are named."""
    import inspect

    known = set(inspect.signature(SimulatedBrain).parameters)
    unknown = sorted(set(config) - known)
    if unknown:
        raise KeyError(f"simulated brain config: unknown key(s) {unknown}; expected some of {sorted(known)}")
    return SimulatedBrain(**config)


def save_brain(brain: SimulatedBrain, path: str | os.PathLike) -> Path:
    """Write the brain's config as JSON (atomically); :func:`load_brain` rebuilds the same brain."""
    return write_json(path, {"format": BRAIN_FORMAT, "config": brain.config})


def load_brain(path: str | os.PathLike) -> SimulatedBrain:
    """The brain of a JSON file written by :func:`save_brain`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"simulated brain file {path} does not exist (write one with save_brain)")
    obj = read_json(path)
    if not isinstance(obj, dict) or obj.get("format") != BRAIN_FORMAT:
        raise ValueError(f"{path} is not a simulated brain file (expected format {BRAIN_FORMAT!r}, found "
                         f"{obj.get('format') if isinstance(obj, dict) else type(obj).__name__!r})")
    return brain_from_config(obj["config"])
