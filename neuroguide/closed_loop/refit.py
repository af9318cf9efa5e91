"""The model of IT in the loop: day 0's model and the daily refit (Guo et al. sec. 3.1, Fig. 4 boxes 0 and 3).

Day 0: the chosen backbone (``loop.model``: ``backbone`` cut at ``layer``, weights from ``at_eps``
through ``paths.robust_weights``, from a file, or ``brain`` = the simulated brain's own trunk) with a
factorized readout initialised from N(0, 1) (scaled by 1/sqrt(h w) and 1/sqrt(C) as in
:class:`neuroguide.models.readouts.FactorizedReadout`: the scale does not change the directions day 0's
attacks take) and bias 0.

Refit after day t: the model that made day t's attacks is trained on every recorded (image, mean response)
pair of days 0..t, clean, attacked and control images alike, with the IT task's objective
(:func:`neuroguide.models.readouts.masked_mse` over the recorded sites + the readout's L1 penalties,
the non-negativity projection after each step), Adam with the readout at ``lr`` and the backbone at
``backbone_lr`` (end to end; 0 keeps the backbone fixed). Batch-norm statistics stay fixed (a few hundred
images a day are too few to re-estimate them). Before the first refit the readout's bias is set to the mean
recorded response. Batches are drawn from a generator seeded by (seed, day): a rerun refits identically.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from neuroguide.models.checkpoints import load_model, save_model_file
from neuroguide.models.it_encoding import ITEncodingModel, it_encoding_model
from neuroguide.models.readouts import masked_mse
from neuroguide.models.robust_weights import load_robust_weights, robust_weights_path
from neuroguide.utils.seeding import derive_seed


def initial_model(loop: dict, site_ids: list[str], robust_weights: dict | None = None,
                  brain: nn.Module | None = None) -> tuple[ITEncodingModel, dict]:
    """Day 0's model and its model_config (the ``it_encoding`` builder's arguments)."""
    m = loop["model"]
    config = {"backbone": m["backbone"], "layer": m["layer"], "n_sites": len(site_ids),
              "image_size": int(loop["image_size"]), "freeze": True, "positive": False}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(int(loop["seed"]), 0, 17))
        model = it_encoding_model(**config)
    if m.get("weights") == "brain":
        if brain is None:
            raise ValueError("loop.model.weights=brain takes the simulated brain's trunk, but loop.brain is null: "
                             "give a weights file, loop.model.at_eps with paths.robust_weights, or simulate")
        if (m["backbone"], m["layer"]) != (brain.config["arch"], brain.config["layer"]):
            raise ValueError(f"loop.model.weights=brain needs loop.model.backbone/layer = the brain's "
                             f"{brain.config['arch']}/{brain.config['layer']}; got {m['backbone']}/{m['layer']}")
        model.backbone.load_state_dict(brain.trunk.state_dict())
        perturb_weights(model.backbone, float(m.get("weight_noise") or 0.0), derive_seed(int(loop["seed"]), 0, 23))
    else:
        try:
            path = robust_weights_path(m.get("at_eps"), robust_weights, m.get("weights"))
        except FileNotFoundError as e:  # name the closed loop's keys, not train.py's
            raise FileNotFoundError(str(e).replace("backbone.", "loop.model.")) from None
        if path is not None:
            load_robust_weights(model.backbone.root, path)
    return model.eval(), config


def perturb_weights(net: nn.Module, relative_sd: float, seed: int) -> None:
    """Add seeded Gaussian noise of ``relative_sd`` x each weight tensor's own std to every conv / linear weight of
    ``net`` (in place; BatchNorm statistics kept): a network related to the brain's but not the brain's, as a trained
    backbone is related to the ventral stream. 0 leaves ``net`` unchanged."""
    if relative_sd < 0:
        raise ValueError(f"loop.model.weight_noise must be >= 0 (a fraction of each weight tensor's std), got {relative_sd}")
    if relative_sd == 0:
        return
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for _name, p in net.named_parameters():
            if p.ndim >= 2:  # conv and linear weights
                p.add_(torch.randn(p.shape, generator=g).to(p) * float(p.std()) * relative_sd)


def save_day_model(path: str | os.PathLike, model: ITEncodingModel, config: dict, facts: dict) -> Path:
    return save_model_file(path, "it_encoding", config, model.state_dict(), facts=facts, task_name="it_encoding")


def load_day_model(path: str | os.PathLike, device: str = "cpu") -> ITEncodingModel:
    return load_model(path, map_location=device, kind="it_encoding")


def refit(model: ITEncodingModel, images: torch.Tensor, targets: torch.Tensor, *, steps: int, batch_size: int,
          lr: float, backbone_lr: float, l1_spatial: float, l1_features: float, seed: int, first: bool,
          progress: bool = True) -> list[float]:
    """Train ``model`` in place on ``images`` (N, 3, S, S) in [0, 1] -> ``targets`` (N, sites) (NaN = not
    recorded) for ``steps`` Adam steps of ``batch_size`` random rows; returns the loss per step."""
    dev = next(model.parameters()).device
    if first:
        model.readout.init_bias(torch.nanmean(targets, 0))
    groups = [{"params": list(model.readout.parameters()), "lr": float(lr)}]
    end_to_end = float(backbone_lr) > 0
    if end_to_end:
        groups.append({"params": list(model.backbone.parameters()), "lr": float(backbone_lr)})
    for p in model.backbone.parameters():
        p.requires_grad_(end_to_end)
    opt = torch.optim.Adam(groups)
    g = torch.Generator().manual_seed(derive_seed(int(seed), 5))
    model.train()
    for mod in model.modules():  # fixed batch-norm statistics (and a fixed backbone when backbone_lr = 0)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) or (not end_to_end and mod is model.backbone):
            mod.eval()
    losses = []
    try:
        for _ in tqdm(range(int(steps)), desc="refit", disable=not progress, leave=False):
            idx = torch.randint(len(images), (min(int(batch_size), len(images)),), generator=g)
            pred = model(images[idx].to(dev))
            loss = masked_mse(pred, targets[idx].to(dev)) + model.readout.l1(float(l1_spatial), float(l1_features))
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.readout.apply_constraints()
            losses.append(float(loss.detach()))
    finally:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        model.eval()
    return losses
