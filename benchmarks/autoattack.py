"""AutoAttack against the project's PGD on one classifier: accuracy (with its binomial standard error) and time
per eps, for each threat model, on the model's own evaluation images, in one process.

Both sides see the same images, labels and eps: PGD as ``eval=[robustness]`` runs it (``--steps`` steps of
2.5 eps / steps, one random start) and AutoAttack in the chosen mode (``fast``: APGD-CE + APGD-T; ``standard``:
the full standard version). AutoAttack is the stronger attack, so its accuracy should never be above PGD's;
the time column says what it costs. Prints one row per (norm, eps) and the totals.

    python benchmarks/autoattack.py --ckpt <model.ckpt> [--n-images 64] [--mode fast] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import torch

from neuroguide.evaluation.analyses.robustness import core as robustness
from neuroguide.evaluation.stimuli import model_stimuli
from neuroguide.models.checkpoints import load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a classifier checkpoint (e.g. a guided model's model.ckpt)")
    ap.add_argument("--n-images", type=int, default=64)
    ap.add_argument("--mode", default="fast", choices=["fast", "standard"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eps-l2", type=float, nargs="*", default=[0.25, 0.5, 1.0])
    ap.add_argument("--eps-linf", type=float, nargs="*", default=[1 / 255, 2 / 255, 4 / 255])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    model = load_model(args.ckpt, map_location=args.device)
    stim = model_stimuli(model, args.n_images, {})
    x, y = stim.images, stim.labels
    n = len(y)
    clean = robustness.accuracy(model, x, y, args.batch_size)
    print(f"{args.ckpt}: {n} images {tuple(x.shape[1:])}, {args.device} ({torch.get_num_threads()} threads), "
          f"clean acc {clean:.3f} +- {robustness.standard_error(clean, n):.3f}")
    print(f"{'norm':>5} {'eps':>8} {'PGD acc':>14} {'PGD s':>7} {'AA acc':>14} {'AA s':>7}  AutoAttack ran")
    totals = {"pgd": 0.0, "aa": 0.0}
    for norm, eps_list in (("l2", args.eps_l2), ("linf", args.eps_linf)):
        for eps in eps_list:
            t = time.perf_counter()
            pgd = robustness.adversarial_accuracy(model, x, y, eps=eps, norm=norm, steps=args.steps,
                                                  batch_size=args.batch_size,
                                                  generator=torch.Generator().manual_seed(0))
            t_pgd = time.perf_counter() - t
            t = time.perf_counter()
            x_adv, ran = robustness.autoattack_examples(model, x, y, eps=eps, norm=norm, mode=args.mode,
                                                        batch_size=args.batch_size)
            aa = float((robustness.predictions(model, x_adv, args.batch_size) == y.cpu()).float().mean())
            t_aa = time.perf_counter() - t
            totals["pgd"] += t_pgd
            totals["aa"] += t_aa
            label = f"{eps * 255:.0f}/255" if norm == "linf" else f"{eps:g}"
            se = robustness.standard_error
            print(f"{norm:>5} {label:>8} {pgd:>7.3f} +- {se(pgd, n):.3f} {t_pgd:>7.1f} {aa:>7.3f} +- {se(aa, n):.3f} "
                  f"{t_aa:>7.1f}  {ran}{'  (AA above PGD!)' if aa > pgd else ''}")
    print(f"total: PGD {totals['pgd']:.1f} s, AutoAttack ({args.mode}) {totals['aa']:.1f} s")


if __name__ == "__main__":
    main()
