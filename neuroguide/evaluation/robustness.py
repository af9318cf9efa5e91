"""Classification robustness: accuracy against eps for PGD L2, PGD Linf and FGSM, beside clean accuracy.

All attacks are untargeted (maximize the per-image cross-entropy) and run through the one engine,
:func:`neuroguide.attacks.pgd_attack`, in [0, 1] pixel space:

- PGD (Madry et al. 2018): random start, ``steps`` steps of ``2.5 * eps / steps`` (default), L2
  (normalized-gradient steps) or Linf (signed-gradient steps), projection and clipping.
- FGSM (Goodfellow et al. 2015): one signed-gradient step of size ``eps`` from the clean image
  (``steps=1``, no random start; the engine keeps the better of ``x`` and the step, by the loss).

``acc(eps) = 1/N sum_n [argmax_k f_k(x_adv_n) = y_n]``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from neuroguide.attacks import objectives, pgd_attack
from neuroguide.attacks.pgd import evaluation_mode
from neuroguide.evaluation.plots import check_eps_list, curve_figure, eps_label, eps_tag, write_csv


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


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


@torch.no_grad()
def predictions(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """(N,) argmax class of ``model`` on ``images`` (N, 3, H, W), in eval mode (restored after)."""
    device = _device_of(model)
    with evaluation_mode(model):
        return torch.cat([model(images[i:i + batch_size].to(device)).argmax(1).cpu()
                          for i in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128) -> float:
    """Clean accuracy, a float in [0, 1]."""
    labels = check_labels(images, labels)
    return float((predictions(model, images, batch_size) == labels).float().mean())


def adversarial_examples(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
                         norm: str = "l2", steps: int = 10, step_size: float | None = None, restarts: int = 1,
                         random_start: bool = True, batch_size: int = 128,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, 3, H, W) untargeted PGD examples (maximize cross-entropy) within ``eps``, on CPU."""
    labels = check_labels(images, labels)
    device = _device_of(model)
    out = []
    for i in range(0, len(images), batch_size):
        x, y = images[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        res = pgd_attack(model, x, objectives.CrossEntropy(y), eps=eps, norm=norm, steps=steps, step_size=step_size,
                         random_start=random_start, restarts=restarts, generator=generator)
        out.append(res.x_adv.detach().cpu())
    return torch.cat(out)


def adversarial_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
                         norm: str = "l2", steps: int = 10, step_size: float | None = None, restarts: int = 1,
                         random_start: bool = True, batch_size: int = 128,
                         generator: torch.Generator | None = None) -> float:
    """Accuracy on PGD examples within ``eps`` (see :func:`adversarial_examples`)."""
    x_adv = adversarial_examples(model, images, labels, eps=eps, norm=norm, steps=steps, step_size=step_size,
                                 restarts=restarts, random_start=random_start, batch_size=batch_size,
                                 generator=generator)
    return float((predictions(model, x_adv, batch_size) == check_labels(images, labels)).float().mean())


def fgsm_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
                  batch_size: int = 128) -> float:
    """Accuracy on FGSM examples ``x + eps * sign(grad_x CE)`` (Linf), clipped to [0, 1]."""
    return adversarial_accuracy(model, images, labels, eps=eps, norm="linf", steps=1, step_size=eps,
                                random_start=False, batch_size=batch_size)


def robustness_curve(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                     eps_l2: Sequence[float] | None = (0.25, 0.5, 1.0),
                     eps_linf: Sequence[float] | None = (1 / 255, 2 / 255, 4 / 255), steps: int = 10,
                     restarts: int = 1, fgsm: bool = True, batch_size: int = 128,
                     generator: torch.Generator | None = None, progress: bool = True) -> list[dict]:
    """Rows ``{"attack", "norm", "eps", "acc", "n"}``: clean (eps 0), PGD L2, PGD Linf and FGSM.

    ``eps_l2`` / ``eps_linf``: non-empty lists of eps > 0, or None to skip that threat model. FGSM
    runs at the ``eps_linf`` values.
    """
    labels = check_labels(images, labels)
    l2 = check_eps_list(eps_l2, "eps_l2") if eps_l2 is not None else []
    linf = check_eps_list(eps_linf, "eps_linf") if eps_linf is not None else []
    linf_fgsm = linf if fgsm else []  # FGSM at the Linf eps
    n = len(labels)
    rows = [{"attack": "clean", "norm": "none", "eps": 0.0, "acc": accuracy(model, images, labels, batch_size), "n": n}]
    jobs = [("pgd", "l2", e) for e in l2] + [("pgd", "linf", e) for e in linf]
    jobs += [("fgsm", "linf", e) for e in linf_fgsm]
    for attack, norm, eps in tqdm(jobs, desc="robustness", disable=not progress, leave=False):
        if attack == "fgsm":
            acc = fgsm_accuracy(model, images, labels, eps=eps, batch_size=batch_size)
        else:
            acc = adversarial_accuracy(model, images, labels, eps=eps, norm=norm, steps=steps, restarts=restarts,
                                       batch_size=batch_size, generator=generator)
        rows.append({"attack": attack, "norm": norm, "eps": eps, "acc": acc, "n": n})
    return rows


def _key(row: dict) -> str:
    if row["attack"] == "clean":
        return "clean"
    return eps_tag("fgsm" if row["attack"] == "fgsm" else row["norm"], row["eps"])


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, out_dir: str | os.PathLike, *,
             eps_l2: Sequence[float] | None = (0.25, 0.5, 1.0),
             eps_linf: Sequence[float] | None = (1 / 255, 2 / 255, 4 / 255), steps: int = 10, restarts: int = 1,
             fgsm: bool = True, batch_size: int = 128, key_prefix: str = "eval/robustness", seed: int | None = 0,
             progress: bool = True) -> dict:
    """Accuracy against eps; writes ``robustness.csv`` and ``robustness.png`` into ``out_dir``.

    Returns flat metrics ``{key_prefix}/clean/acc``, ``{key_prefix}/l2_0.5/acc``,
    ``{key_prefix}/linf_2_255/acc``, ``{key_prefix}/fgsm_2_255/acc``. ``seed`` fixes the random starts.
    """
    rows = robustness_curve(model, images, labels, eps_l2=eps_l2, eps_linf=eps_linf, steps=steps, restarts=restarts,
                            fgsm=fgsm, batch_size=batch_size, progress=progress,
                            generator=torch.Generator().manual_seed(seed) if seed is not None else None)
    out_dir = Path(out_dir)
    for r in rows:
        r["key"] = _key(r)
        r["eps_label"] = "0" if r["attack"] == "clean" else eps_label(r["norm"], r["eps"])
    write_csv(out_dir / "robustness.csv", rows, ["attack", "norm", "eps", "eps_label", "acc", "n", "key"])
    clean = rows[0]["acc"]
    panels = []
    for norm, unit in (("l2", "L2 eps"), ("linf", "Linf eps (x 255)")):
        curves = []
        for attack in ("pgd", "fgsm"):
            sel = [r for r in rows if r["attack"] == attack and r["norm"] == norm]
            if sel:
                scale = 255.0 if norm == "linf" else 1.0
                curves.append({"x": [0.0] + [r["eps"] * scale for r in sel], "y": [clean] + [r["acc"] for r in sel],
                               "label": f"{attack.upper()} {norm.upper()}",
                               "style": "o-" if attack == "pgd" else "s--"})
        if curves:
            panels.append({"title": f"{norm.upper()} attacks", "xlabel": unit, "ylabel": "accuracy", "curves": curves,
                           "hlines": [{"y": clean, "label": f"clean ({clean:.3f})"}]})
    if panels:
        curve_figure(panels, out_dir / "robustness.png", title="classification robustness")
    return {f"{key_prefix}/{r['key']}/acc": r["acc"] for r in rows}


__all__ = ["accuracy", "adversarial_accuracy", "adversarial_examples", "fgsm_accuracy", "robustness_curve", "evaluate",
           "predictions", "check_labels"]
