"""Adversarially trained against plain classifiers, paired on the same test images: robust accuracy under the same
PGD (``eval=[robustness]``'s: ``--steps`` steps of 2.5 eps / steps from one seeded random start) for each model, and
for each AT model against the plain one the discordant images (right only under AT, right only plain) with the exact
McNemar test (binomial on the discordant pairs). Paired, the comparison resolves differences that two separate
binomial standard errors on a few hundred images cannot.

    python benchmarks/adversarial_training.py --plain <model.ckpt> --at <model.ckpt> [<model.ckpt> ...] \\
        [--eps 1.0 2.0] [--steps 10] [--n-images all]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from scipy.stats import binomtest

from neuroguide.attacks import pgd_attack
from neuroguide.attacks.objectives import CrossEntropy
from neuroguide.evaluation.stimuli import model_stimuli
from neuroguide.models.checkpoints import load_model


def robust_correct(model, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, seed: int = 0) -> torch.Tensor:
    """(N,) bool: the model's prediction on its PGD (L2, ``steps`` steps, seeded random start) image is ``y``."""
    res = pgd_attack(model, x, CrossEntropy(y), eps=eps, norm="l2", steps=steps,
                     generator=torch.Generator().manual_seed(seed), batch_size=100)
    with torch.no_grad():
        return model(res.x_adv).argmax(1) == y


def paired(plain: str, at: list[str], eps_list: list[float], steps: int = 10, n_images: int | None = None) -> list[dict]:
    """For each eps and AT model against the plain one (checkpoint paths): their robust accuracies on the same
    images, the discordant counts (right only under AT, right only plain) and the exact McNemar p-value."""
    models = {"plain": load_model(plain), **{Path(p).parent.name: load_model(p) for p in at}}
    stim = model_stimuli(models["plain"], n_images)
    x, y = stim.images, stim.labels
    rows = []
    for eps in eps_list:
        correct = {k: robust_correct(m, x, y, eps, steps) for k, m in models.items()}
        for k in models:
            if k == "plain":
                continue
            a, p = correct[k], correct["plain"]
            b, c = int((a & ~p).sum()), int((~a & p).sum())
            rows.append({"model": k, "eps": eps, "acc": float(a.float().mean()), "plain_acc": float(p.float().mean()),
                         "only_at": b, "only_plain": c, "p": binomtest(b, b + c, 0.5).pvalue if b + c else 1.0,
                         "n": len(y), "source": stim.source})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plain", required=True, help="model.ckpt of the plain run")
    ap.add_argument("--at", nargs="+", required=True, help="model.ckpt of adversarially trained runs")
    ap.add_argument("--eps", nargs="+", type=float, default=[1.0, 2.0], help="L2 eps to attack at")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--n-images", default="all", help="test images spread over the held-out split (all: every one)")
    a = ap.parse_args()
    rows = paired(a.plain, a.at, a.eps, a.steps, None if a.n_images == "all" else int(a.n_images))
    if rows:
        print(f"{rows[0]['n']} test images ({rows[0]['source']}), PGD L2 {a.steps} steps")
    for r in rows:
        print(f"L2 {r['eps']}: {r['model']} {r['acc']:.3f} vs plain {r['plain_acc']:.3f}; right only under AT "
              f"{r['only_at']}, only plain {r['only_plain']}; exact McNemar p = {r['p']:.2g}")


if __name__ == "__main__":
    main()
