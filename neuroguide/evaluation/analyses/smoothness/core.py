"""Smoothness of the loss surface (Shao et al., the NeuralGuidance measure).

The mean squared norm of the input gradient of the cross-entropy loss::

    S = 1/N sum_n || grad_x CE(f(x), y_n) at x = x_n ||_2^2

at the clean images ``x_n`` (``clean``) and at adversarial points ``x_n + d_n`` (``adv``): untargeted
PGD that maximizes the cross-entropy within ``||d_n|| <= eps`` (the project's attack engine,
:func:`neuroguide.attacks.pgd_attack`). Gradients are taken in [0, 1] pixel space (normalization is
inside the model) of each image's own loss, so the value does not depend on the batch size. A
smaller S is a smoother (flatter) loss surface around the data; Shao et al. compare it across
guided models and match weight-decay baselines on it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from neuroguide.attacks import objectives, pgd_attack
from neuroguide.models.features import device_of, evaluation_mode


def _check(images: torch.Tensor, labels) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images: expected (N, 3, H, W) in [0, 1], got {tuple(getattr(images, 'shape', ()))}")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels: expected ({images.shape[0]},) class indices, one per image; got shape "
                         f"{tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels: expected integer class indices, got dtype {labels.dtype}")
    return labels.long()


def input_gradient_sq_norms(model: nn.Module, images: torch.Tensor, labels, *, batch_size: int = 128
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: ``||grad_x CE(f(x), y)||_2^2`` and the loss ``CE(f(x), y)``; two (N,) CPU tensors.

    The model runs in eval mode with frozen parameters (both restored afterwards).
    """
    labels = _check(images, labels)
    device = device_of(model)
    sq, losses = [], []
    with evaluation_mode(model), torch.enable_grad():
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device).detach().requires_grad_(True)
            y = labels[i:i + batch_size].to(device)
            loss = F.cross_entropy(model(x), y, reduction="none")  # (B,): each row depends on its own image only
            (grad,) = torch.autograd.grad(loss.sum(), x)
            sq.append(grad.flatten(1).square().sum(1).detach().cpu())
            losses.append(loss.detach().cpu())
    return torch.cat(sq), torch.cat(losses)


def adversarial_points(model: nn.Module, images: torch.Tensor, labels, *, eps: float, norm: str = "l2", steps: int = 10,
                       step_size: float | None = None, restarts: int = 1, batch_size: int = 128,
                       generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """(N, 3, H, W) untargeted PGD points (maximize CE) within ``eps`` of ``images``, on the CPU."""
    labels = _check(images, labels)
    device = device_of(model)
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="PGD", disable=not progress, leave=False):
        x, y = images[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        res = pgd_attack(model, x, objectives.CrossEntropy(y), eps=eps, norm=norm, steps=steps, step_size=step_size,
                         restarts=restarts, generator=generator)
        out.append(res.x_adv.detach().cpu())
    return torch.cat(out)


def evaluate(model: nn.Module, images: torch.Tensor, labels, out_dir: str | os.PathLike, *, eps: float = 1.0,
             norm: str = "l2", steps: int = 10, step_size: float | None = None, restarts: int = 1,
             batch_size: int = 128, seed: int = 0, key_prefix: str = "eval/smoothness", progress: bool = True) -> dict:
    """Smoothness at clean and adversarial points.

    Returns ``{key_prefix}/clean`` and ``{key_prefix}/adv`` (mean squared input-gradient norms), and
    ``{key_prefix}/loss_clean``, ``{key_prefix}/loss_adv`` (mean cross-entropy). Writes
    ``smoothness.csv`` (per image) and ``smoothness.png`` (histograms) into ``out_dir``.
    """
    from neuroguide.evaluation.plots import check_eps_list, eps_label, plt, save_figure, write_csv

    eps = check_eps_list([eps], "eval.smoothness.eps", norm)[0]  # > 0, k/255 for Linf, units checked
    labels = _check(images, labels)
    g_clean, l_clean = input_gradient_sq_norms(model, images, labels, batch_size=batch_size)
    gen = torch.Generator(device=device_of(model)).manual_seed(seed)
    x_adv = adversarial_points(model, images, labels, eps=eps, norm=norm, steps=steps, step_size=step_size,
                               restarts=restarts, batch_size=batch_size, generator=gen, progress=progress)
    g_adv, l_adv = input_gradient_sq_norms(model, x_adv, labels, batch_size=batch_size)
    metrics = {f"{key_prefix}/clean": float(g_clean.mean()), f"{key_prefix}/adv": float(g_adv.mean()),
               f"{key_prefix}/loss_clean": float(l_clean.mean()), f"{key_prefix}/loss_adv": float(l_adv.mean())}
    out_dir = Path(out_dir)
    rows = [{"image": i, "label": int(labels[i]), "grad_sq_clean": float(g_clean[i]), "grad_sq_adv": float(g_adv[i]),
             "loss_clean": float(l_clean[i]), "loss_adv": float(l_adv[i])} for i in range(len(labels))]
    write_csv(out_dir / "smoothness.csv", rows)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    tiny = 1e-30
    vals = np.log10(np.concatenate([g_clean.numpy(), g_adv.numpy()]) + tiny)
    bins = np.linspace(vals.min(), vals.max() + 1e-9, 30)
    ax.hist(np.log10(g_clean.numpy() + tiny), bins=bins, alpha=0.6, label=f"clean (mean {metrics[f'{key_prefix}/clean']:.3g})")
    ax.hist(np.log10(g_adv.numpy() + tiny), bins=bins, alpha=0.6,
            label=f"{norm} eps {eps_label(norm, eps)} (mean {metrics[f'{key_prefix}/adv']:.3g})")
    ax.set_xlabel("log10 ||grad_x CE||^2")
    ax.set_ylabel("images")
    ax.set_title("smoothness: squared input-gradient norm of the loss", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, out_dir / "smoothness.png")
    return metrics
