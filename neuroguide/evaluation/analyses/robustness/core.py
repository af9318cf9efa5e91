"""Classification robustness: accuracy against eps for PGD L2, PGD Linf, FGSM and AutoAttack, beside clean
accuracy.

All attacks are untargeted and work in [0, 1] pixel space. PGD and FGSM maximize the per-image
cross-entropy with the one engine, :func:`neuroguide.attacks.pgd_attack`:

- PGD (Madry et al. 2018): random start, ``steps`` steps of ``2.5 * eps / steps`` (default), L2
  (normalized-gradient steps) or Linf (signed-gradient steps), projection onto ball ∩ box.
- FGSM (Goodfellow et al. 2015): one signed-gradient step of size ``eps`` from the clean image
  (``steps=1``, no random start; the engine keeps the better of ``x`` and the step, by the loss).

AutoAttack (Croce & Hein 2020; the authors' ``pyautoattack`` package) is the strong evaluation, run at the
same eps lists (L2 and Linf) on the same images, on the model's logits of [0, 1] images, in eval mode,
on the model's device:

- ``"standard"``: the authors' standard version (APGD-CE, APGD-T, FAB-T, Square);
- ``"fast"``: ``version="custom"`` with APGD-CE and APGD-T only (one restart, 100 iterations each, the
  package defaults): the standard version's two APGD attacks, without FAB-T and Square;
- ``False``: not run;
- ``"auto"`` (the default): ``"fast"`` when the model is on a GPU, not run on a CPU. The fast version spends
  up to 100 x (1 + 9) gradient evaluations per image and eps against PGD's 10, so on a CPU it multiplies the
  evaluation's time (``benchmarks/autoattack.py`` measures it): ask for it there with ``autoattack="fast"``.

Targeted attacks aim at the ``min(9, K - 1)`` highest other classes (``K`` logits; the standard version's
9 needs ``K >= 10``). APGD-T's targeted DLR loss needs ``K >= 4``, so with 2 or 3 classes APGD-T is left
out: the standard version keeps FAB-T (aiming at the ``K - 1`` others), and ``"fast"`` runs FAB-T in its
place (APGD-CE alone misses points that only a targeted attack flips). The attacks actually run are
written in the CSV's ``attacks`` column.

``acc(eps) = 1/N sum_n [argmax_k f_k(x_adv_n) = y_n]``, with its binomial standard error
``se = sqrt(acc (1 - acc) / N)``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from neuroguide.attacks import objectives, pgd_attack
from neuroguide.models.features import device_of, evaluation_mode
from neuroguide.evaluation.checks import check_labels
from neuroguide.evaluation.plots import check_eps_list, curve_figure, eps_label, eps_tag, write_csv

log = logging.getLogger("neuroguide")

AA_NORMS = {"l2": "L2", "linf": "Linf"}
AA_MAX_TARGETS = 9  # the standard version's number of target classes
AA_FAST_EVALS = 100 * (1 + AA_MAX_TARGETS)  # gradient evaluations per image of "fast" at most (APGD-CE + APGD-T)


@torch.no_grad()
def predictions(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """(N,) argmax class of ``model`` on ``images`` (N, 3, H, W), in eval mode (restored after)."""
    device = device_of(model)
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
    device = device_of(model)
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


def standard_error(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` images: ``sqrt(acc (1 - acc) / n)``."""
    return math.sqrt(max(acc * (1 - acc), 0.0) / n) if n > 0 else float("nan")


def check_autoattack(mode, device: torch.device | str | None = None) -> str | None:
    """``"standard"`` / ``"fast"`` / None (off) from a config value (``false``/``none``/``off`` turn it off;
    ``auto`` is ``fast`` when ``device`` is a GPU and off on a CPU)."""
    if mode is None or mode is False:
        return None
    key = str(mode).strip().lower()
    if key in ("false", "none", "off", "no", "0", ""):
        return None
    if key == "auto":
        return "fast" if device is not None and torch.device(device).type != "cpu" else None
    if key not in ("standard", "fast"):
        raise ValueError(f"eval.robustness.autoattack: expected auto, standard, fast or false, got {mode!r} (fast: "
                         "APGD-CE + APGD-T; standard: the full AutoAttack; auto: fast on a GPU, off on a CPU)")
    return key


class _Logits(nn.Module):
    """What AutoAttack sees: float logits (B, K) of images in [0, 1]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float().flatten(1)


def autoattack_plan(mode: str, num_classes: int) -> tuple[list[str], int]:
    """(attacks, target classes) of an AutoAttack run with ``num_classes`` logits: see the module docstring."""
    attacks = ["apgd-ce", "apgd-t", "fab-t", "square"] if mode == "standard" else ["apgd-ce", "apgd-t"]
    n_targets = max(1, min(AA_MAX_TARGETS, num_classes - 1))
    if num_classes < 4:  # the targeted DLR loss uses the 3rd and 4th largest logits
        attacks.remove("apgd-t")
        if "fab-t" not in attacks:  # fast: FAB-T, the standard version's other targeted attack, in its place
            attacks.append("fab-t")
    return attacks, n_targets


def _plan_label(attacks: list[str], n_targets: int) -> str:
    return "+".join(f"{a}({n_targets})" if a.endswith("-t") else a for a in attacks)


def autoattack_examples(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
                        norm: str = "l2", mode: str = "fast", batch_size: int = 128,
                        seed: int | None = 0) -> tuple[torch.Tensor, str]:
    """(N, 3, H, W) AutoAttack examples within ``eps`` on CPU, and the attacks run (e.g.
    ``"apgd-ce+apgd-t(9)"``). An image the attacks cannot flip (or a misclassified one) is returned clean.

    The model runs in eval mode with frozen parameters (restored after); the global random state is
    restored after the run (AutoAttack reseeds it with ``seed``).
    """
    from pyautoattack import AutoAttack

    device = device_of(model)
    mode = check_autoattack(mode, device)
    if mode is None:
        raise ValueError(f"autoattack_examples: mode {mode!r} runs no attack here; expected 'standard' or 'fast'")
    key = str(norm).lower()
    if key not in AA_NORMS:
        raise ValueError(f"AutoAttack norm {norm!r} is not supported here: expected one of {sorted(AA_NORMS)}")
    labels = check_labels(images, labels)
    wrapped = _Logits(model)
    devices = [device] if device.type == "cuda" else []
    with contextlib.ExitStack() as stack:
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))
        stack.enter_context(evaluation_mode(model))
        stack.enter_context(torch.random.fork_rng(devices=devices))
        images = images.detach().float().cpu().clone()
        with torch.no_grad():
            num_classes = wrapped(images[:1].to(device)).shape[1]
        attacks, n_targets = autoattack_plan(mode, num_classes)
        if mode == "standard":
            aa = AutoAttack(wrapped, norm=AA_NORMS[key], eps=float(eps), version="standard", device=device,
                            seed=seed)
            aa.attacks_to_run = attacks
        else:
            aa = AutoAttack(wrapped, attacks=attacks, norm=AA_NORMS[key], eps=float(eps), version="custom",
                            device=device, seed=seed)
            aa.apgd.n_restarts = 1
            aa.apgd_targeted.n_restarts = 1
        aa.apgd_targeted.n_target_classes = n_targets
        aa.fab.n_target_classes = n_targets
        x_adv, _ = aa.run_standard_evaluation(images, labels, batch_size=batch_size)
    return x_adv.detach().cpu(), _plan_label(attacks, n_targets)


def autoattack_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
                        norm: str = "l2", mode: str = "fast", batch_size: int = 128, seed: int | None = 0) -> float:
    """Accuracy on AutoAttack examples within ``eps`` (see :func:`autoattack_examples`)."""
    x_adv, _ = autoattack_examples(model, images, labels, eps=eps, norm=norm, mode=mode, batch_size=batch_size,
                                   seed=seed)
    return float((predictions(model, x_adv, batch_size) == check_labels(images, labels)).float().mean())


def _skipped(eps) -> bool:
    return eps is None or (isinstance(eps, Sequence) and not isinstance(eps, str) and len(eps) == 0)


def _eps_lists(eps_l2, eps_linf) -> tuple[list[float], list[float]]:
    """The checked L2 and Linf eps lists; an empty one (or None) skips its threat model, not both."""
    if _skipped(eps_l2) and _skipped(eps_linf):
        raise ValueError(f"eval.robustness.eps_l2 and eval.robustness.eps_linf are both empty (got {eps_l2!r} and "
                         f"{eps_linf!r}): give at least one eps in either, e.g. "
                         "eval.robustness.eps_linf=[2/255] for a Linf-only evaluation or "
                         "eval.robustness.eps_l2=[0.5] for an L2-only one")
    l2 = [] if _skipped(eps_l2) else check_eps_list(eps_l2, "eval.robustness.eps_l2", norm="l2")
    linf = [] if _skipped(eps_linf) else check_eps_list(eps_linf, "eval.robustness.eps_linf", norm="linf")
    return l2, linf


def robustness_curve(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                     eps_l2: Sequence[float] | None = (0.25, 0.5, 1.0),
                     eps_linf: Sequence[float] | None = (1 / 255, 2 / 255, 4 / 255), steps: int = 10,
                     restarts: int = 1, fgsm: bool = True, autoattack: str | bool | None = "auto",
                     batch_size: int = 128, generator: torch.Generator | None = None, seed: int | None = 0,
                     progress: bool = True) -> list[dict]:
    """Rows ``{"attack", "norm", "eps", "acc", "acc_se", "n", "attacks"}``: clean (eps 0), PGD L2, PGD Linf,
    FGSM and AutoAttack.

    ``eps_l2`` / ``eps_linf``: lists of eps > 0; an empty list (or None) skips that threat model (a Linf-only
    or an L2-only evaluation), but not both. FGSM runs at the ``eps_linf`` values; AutoAttack (``"standard"``,
    ``"fast"``, ``"auto"``: fast on a GPU, off on a CPU, or False) at both lists.
    ``acc_se`` is the binomial standard error over the ``n`` images; ``attacks`` names what AutoAttack ran.
    """
    labels = check_labels(images, labels)
    l2, linf = _eps_lists(eps_l2, eps_linf)
    aa_mode = check_autoattack(autoattack, device_of(model))
    if str(autoattack).strip().lower() == "auto" and aa_mode is None:
        log.info("robustness: AutoAttack skipped on CPU (autoattack=auto; it costs up to %d gradient evaluations "
                 "per image and eps against PGD's %d): set eval.robustness.autoattack=fast to run it anyway",
                 AA_FAST_EVALS, steps)
    linf_fgsm = linf if fgsm else []  # FGSM at the Linf eps
    n = len(labels)
    acc = accuracy(model, images, labels, batch_size)
    rows = [{"attack": "clean", "norm": "none", "eps": 0.0, "acc": acc, "acc_se": standard_error(acc, n), "n": n,
             "attacks": ""}]
    jobs = [("pgd", "l2", e) for e in l2] + [("pgd", "linf", e) for e in linf]
    jobs += [("fgsm", "linf", e) for e in linf_fgsm]
    if aa_mode:
        jobs += [("autoattack", "l2", e) for e in l2] + [("autoattack", "linf", e) for e in linf]
    for attack, norm, eps in tqdm(jobs, desc="robustness", disable=not progress, leave=False):
        ran = ""
        if attack == "fgsm":
            acc = fgsm_accuracy(model, images, labels, eps=eps, batch_size=batch_size)
        elif attack == "autoattack":
            x_adv, ran = autoattack_examples(model, images, labels, eps=eps, norm=norm, mode=aa_mode,
                                             batch_size=batch_size, seed=seed)
            ran = f"{aa_mode}: {ran}"
            acc = float((predictions(model, x_adv, batch_size) == labels).float().mean())
        else:
            acc = adversarial_accuracy(model, images, labels, eps=eps, norm=norm, steps=steps, restarts=restarts,
                                       batch_size=batch_size, generator=generator)
        rows.append({"attack": attack, "norm": norm, "eps": eps, "acc": acc, "acc_se": standard_error(acc, n),
                     "n": n, "attacks": ran})
    aa_rows = [r for r in rows if r["attack"] == "autoattack"]
    if aa_rows:
        log.info("robustness: AutoAttack %s", aa_rows[0]["attacks"])
    return rows


def _key(row: dict) -> str:
    if row["attack"] == "clean":
        return "clean"
    if row["attack"] == "autoattack":
        return f"autoattack/{eps_tag(row['norm'], row['eps'])}"
    return eps_tag("fgsm" if row["attack"] == "fgsm" else row["norm"], row["eps"])


CURVE_STYLES = {"pgd": ("PGD", "o-"), "fgsm": ("FGSM", "s--"), "autoattack": ("AutoAttack", "^-")}


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, out_dir: str | os.PathLike, *,
             eps_l2: Sequence[float] | None = (0.25, 0.5, 1.0),
             eps_linf: Sequence[float] | None = (1 / 255, 2 / 255, 4 / 255), steps: int = 10, restarts: int = 1,
             fgsm: bool = True, autoattack: str | bool | None = "auto", batch_size: int = 128,
             key_prefix: str = "eval/robustness", seed: int | None = 0, progress: bool = True) -> dict:
    """Accuracy against eps; writes ``robustness.csv`` and ``robustness.png`` (PGD, FGSM and AutoAttack
    curves with bands of one standard error) into ``out_dir``.

    Returns flat metrics ``{key_prefix}/clean/acc``, ``{key_prefix}/l2_0.5/acc``,
    ``{key_prefix}/linf_2_255/acc``, ``{key_prefix}/fgsm_2_255/acc``, ``{key_prefix}/autoattack/l2_0.5/acc``,
    each with its binomial standard error ``.../acc_se``, and ``{key_prefix}/n_images``. ``seed`` fixes the
    random starts (PGD) and AutoAttack's seed.
    """
    rows = robustness_curve(model, images, labels, eps_l2=eps_l2, eps_linf=eps_linf, steps=steps, restarts=restarts,
                            fgsm=fgsm, autoattack=autoattack, batch_size=batch_size, progress=progress, seed=seed,
                            generator=torch.Generator().manual_seed(seed) if seed is not None else None)
    out_dir = Path(out_dir)
    for r in rows:
        r["key"] = _key(r)
        r["eps_label"] = "0" if r["attack"] == "clean" else eps_label(r["norm"], r["eps"])
    write_csv(out_dir / "robustness.csv", rows,
              ["attack", "norm", "eps", "eps_label", "acc", "acc_se", "n", "key", "attacks"])
    clean, clean_se = rows[0]["acc"], rows[0]["acc_se"]
    panels = []
    for norm, unit in (("l2", "L2 eps"), ("linf", "Linf eps (x 255)")):
        curves = []
        for attack, (name, style) in CURVE_STYLES.items():
            sel = [r for r in rows if r["attack"] == attack and r["norm"] == norm]
            if sel:
                scale = 255.0 if norm == "linf" else 1.0
                curves.append({"x": [0.0] + [r["eps"] * scale for r in sel], "y": [clean] + [r["acc"] for r in sel],
                               "yerr": [clean_se] + [r["acc_se"] for r in sel],
                               "label": f"{name} {norm.upper()}", "style": style})
        if curves:
            panels.append({"title": f"{norm.upper()} attacks", "xlabel": unit, "ylabel": "accuracy", "curves": curves,
                           "hlines": [{"y": clean, "label": f"clean ({clean:.3f})"}]})
    if panels:
        n = rows[0]["n"]
        curve_figure(panels, out_dir / "robustness.png",
                     title=f"classification robustness ({n} images; bands: one binomial standard error)")
    metrics = {f"{key_prefix}/{r['key']}/acc": r["acc"] for r in rows}
    metrics.update({f"{key_prefix}/{r['key']}/acc_se": r["acc_se"] for r in rows})
    metrics[f"{key_prefix}/n_images"] = rows[0]["n"]
    return metrics


__all__ = ["accuracy", "adversarial_accuracy", "adversarial_examples", "fgsm_accuracy", "autoattack_examples",
           "autoattack_accuracy", "autoattack_plan", "robustness_curve", "evaluate", "predictions",
           "standard_error"]
