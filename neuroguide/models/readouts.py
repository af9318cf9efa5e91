"""Factorized (spatial x channel) readout, Klindt et al. 2017.

For a feature map ``F`` (B, C, h, w) the response of site ``n`` is

    r_n = sum_{c,h,w} features[n, c] * spatial[n, h, w] * F[c, h, w] + b_n

with a spatial mask ``spatial`` (n, h, w) ("where") and channel weights ``features`` (n, C)
("what"), L1-regularized (:meth:`FactorizedReadout.l1`). Guo et al. map the AT-ResNet50 layer4.0 to
the IT sites this way, initializing both factors as N(0, 1); here they are N(0, 1) scaled by
1/sqrt(h*w) and 1/sqrt(C) so the initial predictions have the scale of the features. The bias
starts at the mean response (:meth:`FactorizedReadout.init_bias`). With ``positive=True`` both
factors are kept >= 0 by projection (:meth:`FactorizedReadout.apply_constraints`, called after every
optimizer step).

Centring (``center=True``, the default): the readout sees ``F - m`` with ``m`` (C, h, w) the mean
feature map of the training batches seen so far (a buffer, updated in training mode only, like
BatchNorm's running mean, and fixed in eval mode). For a fixed ``m`` this is the same model with bias
``b_n - sum features * spatial * m``; it only conditions the fit, since post-ReLU features have
large means that couple every weight to the bias (``tests/test_it_readout.py`` checks that the
uncentred fit ends worse on the synthetic teacher data).

:func:`fit_readout` fits a readout to precomputed features of a frozen backbone (the backbone runs
once, not every epoch) with the IT task's objective (:func:`masked_mse` + L1).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class FactorizedReadout(nn.Module):
    """(B, C, h, w) -> (B, n_sites).

    Args:
        in_shape: (C, h, w) of the feature map.
        n_sites: number of outputs (recorded sites).
        positive: keep ``spatial`` and ``features`` non-negative (projected after each step).
        center: subtract the running mean feature map ``feature_mean`` (see the module docstring).
    """

    def __init__(self, in_shape: tuple[int, int, int], n_sites: int, positive: bool = False, center: bool = True):
        super().__init__()
        c, h, w = (int(v) for v in in_shape)
        if min(c, h, w, int(n_sites)) < 1:
            raise ValueError(f"FactorizedReadout needs positive in_shape (C, h, w) and n_sites; "
                             f"got {in_shape}, {n_sites}")
        self.in_shape, self.n_sites, self.positive, self.center = (c, h, w), int(n_sites), bool(positive), bool(center)
        self.spatial = nn.Parameter(torch.randn(n_sites, h, w) / math.sqrt(h * w))
        self.features = nn.Parameter(torch.randn(n_sites, c) / math.sqrt(c))
        self.bias = nn.Parameter(torch.zeros(n_sites))
        self.register_buffer("feature_mean", torch.zeros(c, h, w))
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        if self.positive:
            with torch.no_grad():
                self.spatial.abs_()
                self.features.abs_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"FactorizedReadout expects feature maps (B, {', '.join(map(str, self.in_shape))}); "
                             f"got {tuple(x.shape)}. The image size or backbone layer differs from the one the "
                             "readout was built for")
        if self.center:
            if self.training:
                with torch.no_grad():  # cumulative mean over the training batches seen
                    self.batches_seen += 1
                    self.feature_mean.add_((x.detach().mean(0) - self.feature_mean) / self.batches_seen)
            x = x - self.feature_mean
        pooled = torch.einsum("bchw,nhw->bnc", x, self.spatial)  # (B, n, C): spatially weighted channels
        return (pooled * self.features).sum(-1) + self.bias

    def l1(self, spatial: float = 0.0, features: float = 0.0) -> torch.Tensor:
        """``spatial * mean_n sum_hw |spatial| + features * mean_n sum_c |features|``."""
        return (spatial * self.spatial.abs().sum((1, 2)).mean()
                + features * self.features.abs().sum(1).mean())

    @torch.no_grad()
    def init_bias(self, mean_response: torch.Tensor) -> None:
        """Set ``b_n`` to the mean training response of each site (n_sites,); NaN -> 0."""
        m = torch.as_tensor(mean_response, dtype=self.bias.dtype, device=self.bias.device).flatten()
        if m.numel() != self.n_sites:
            raise ValueError(f"init_bias: got {m.numel()} mean responses for a readout of {self.n_sites} sites")
        self.bias.copy_(torch.nan_to_num(m, nan=0.0))

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Projection onto the constraint set: both factors clamped to >= 0 when ``positive``."""
        if self.positive:
            self.spatial.clamp_(min=0)
            self.features.clamp_(min=0)

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, n_sites={self.n_sites}, positive={self.positive}, center={self.center}"


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the finite entries of ``target`` (B, n_sites); NaN = not recorded."""
    ok = torch.isfinite(target)
    if not bool(ok.any()):
        return pred.sum() * 0.0
    return ((pred - torch.nan_to_num(target)) ** 2)[ok].mean()


def fit_readout(readout: FactorizedReadout, features: torch.Tensor, targets: torch.Tensor, *, steps: int = 1000,
                lr: float = 1e-2, l1_spatial: float = 1.0, l1_features: float = 1.0,
                batch_size: int | None = None, seed: int = 0) -> list[float]:
    """Fit ``readout`` to precomputed (frozen-backbone) ``features`` (N, C, h, w) -> ``targets`` (N, n_sites).

    The same objective as the IT task (:func:`masked_mse` + :meth:`FactorizedReadout.l1`), with Adam;
    full batch unless ``batch_size``. Returns the loss per step.
    """
    opt = torch.optim.Adam(readout.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(int(steps)):
        idx = slice(None) if batch_size is None else torch.randint(len(features), (int(batch_size),), generator=g)
        loss = masked_mse(readout(features[idx]), targets[idx]) + readout.l1(l1_spatial, l1_features)
        opt.zero_grad()
        loss.backward()
        opt.step()
        readout.apply_constraints()
        losses.append(float(loss.detach()))
    return losses
