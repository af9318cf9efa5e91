"""What a cheap unit-sensitivity budget finds of Guo et al.'s full one (250 steps x best of 100 restarts).

Both sides run in this process on the same model, units, images and eps, through the project's
``unit_sensitivity`` (both directions, the Guo schedule: a ball of 2 eps then eps, annealed step sizes).
For every budget STEPSxRESTARTS the script prints

- the fraction of the full-budget sensitivity it finds: the mean over (unit, image, eps) of
  ``s_budget(x, eps) / s_full(x, eps)`` (and the smallest such ratio), and the aggregate ratio of means
  ``mean s_budget / mean s_full``;
- its gradient evaluations (``SensitivityResult.grad_evals``, rows x steps) and their ratio to the full
  budget's.

It then names the cheapest budget that finds at least ``--target`` (95%) of the full sensitivity, by both
measures, with at most ``--max-evals`` (1/10) of its gradient evaluations, and marks the default of
``conf/eval/sensitivity.yaml``.

The model: the project's ResNet18 (``NormalizedResNet``, torchvision layers, normalization first) at
``--size`` px, trained for ``--train-epochs`` epochs on synthetic classes (the renderer of
``neuroguide.data.synthetic.imagenet``, in memory), so that its units are those of a network that has
learned something; the units are its penultimate features (``avgpool``, as in the paper), drawn among the
units that respond to every attacked image, and the attacked images are held-out renders. L2 eps is in
[0, 1] pixel units at ``--size`` px: eps 0.25 and 1.0 at 32 px are about 1.75 and 7 at 224 px (the L2 norm of a perturbation of
the same size per pixel grows with the side), inside the paper's range 0.1 .. 10.

Cost: the full budget is 2 directions x 100 restarts x 250 steps = 50,000 gradient evaluations per
(unit, image, eps), 3.5 minutes on one thread of a busy shared 2-core CPU at 32 px; so the default is
only 3 units x 2 images x 2 eps = 12 triples (50 minutes in all there, 43 of them for the full budget), and
``--quick`` is 1 unit x 1 image x 1 eps, a smoke test of a few minutes rather than a measurement. The
script says what it ran.

    python benchmarks/sensitivity_budget.py [--quick] [--units 3] [--images 2] [--eps 0.25 1.0] [--size 32]
        [--budgets 8x1 16x1 16x2 ...] [--full 250x100] [--threads 1]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neuroguide.evaluation.analyses.sensitivity.core import unit_sensitivity
from neuroguide.models.features import LayerOutput
from neuroguide.models.resnet import NormalizedResNet

LAYER = "avgpool"
BUDGETS = ["8x1", "16x1", "16x2", "32x1", "32x2", "64x1", "32x4", "64x2", "128x1", "64x4", "128x2", "250x1",
           "128x4", "250x2", "250x4", "250x10"]
QUICK_BUDGETS = ["8x1", "16x1", "16x2", "32x2", "64x2", "64x4", "250x10"]
CONFIG = Path(__file__).resolve().parents[1] / "conf" / "eval" / "sensitivity.yaml"


def parse_budget(text: str) -> tuple[int, int]:
    try:
        steps, restarts = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"budget {text!r}: expected STEPSxRESTARTS, e.g. 32x2") from None
    if steps < 1 or restarts < 1:
        raise SystemExit(f"budget {text!r}: steps and restarts must be >= 1")
    return steps, restarts


def config_default() -> tuple[int, int] | None:
    """(steps, restarts) of conf/eval/sensitivity.yaml."""
    try:
        from omegaconf import OmegaConf

        c = OmegaConf.load(CONFIG).sensitivity
        return int(c.steps), int(c.restarts)
    except Exception:  # the table is still worth printing
        return None


def synthetic_set(n_classes: int, per_class: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered images (N, 3, S, S) in [0, 1] and labels, ``per_class`` of each class, shuffled."""
    from neuroguide.data.synthetic.imagenet import class_recipes, render_image

    rng = np.random.default_rng(seed)
    recipes = class_recipes(n_classes)
    imgs, labels = [], []
    for c, recipe in enumerate(recipes):
        for _ in range(per_class):
            imgs.append(render_image(recipe, size, rng))
            labels.append(c)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    y = torch.tensor(labels)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm], y[perm]


def trained_resnet(args) -> tuple[torch.nn.Module, torch.Tensor, float]:
    """ResNet18 trained briefly on synthetic classes; returns (model, held-out images, held-out accuracy)."""
    torch.manual_seed(args.seed)
    x_train, y_train = synthetic_set(args.classes, args.train_per_class, args.size, seed=args.seed)
    x_test, y_test = synthetic_set(args.classes, 16, args.size, seed=args.seed + 1)
    model = NormalizedResNet("resnet18", args.classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.train_epochs):
        model.train()
        for idx in torch.randperm(len(y_train), generator=g).split(32):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == y_test).float().mean()) if args.train_epochs else math.nan
    return model, x_test, acc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 unit x 1 image x 1 eps, fewer budgets, 1 epoch")
    ap.add_argument("--units", type=int, default=3, help="avgpool units (drawn among responding units)")
    ap.add_argument("--images", type=int, default=2, help="attacked held-out images")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.25, 1.0], help="L2 eps at --size px")
    ap.add_argument("--size", type=int, default=32, help="image size in px")
    ap.add_argument("--full", default="250x100", help="the reference budget STEPSxRESTARTS (Guo et al.: 250x100)")
    ap.add_argument("--budgets", nargs="+", default=None, help=f"cheaper budgets (default {' '.join(BUDGETS)})")
    ap.add_argument("--target", type=float, default=0.95, help="fraction of the full sensitivity to find")
    ap.add_argument("--max-evals", type=float, default=0.1, help="largest allowed fraction of the full evaluations")
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--train-per-class", type=int, default=40)
    ap.add_argument("--train-epochs", type=int, default=3, help="0: random weights")
    ap.add_argument("--batch-size", type=int, default=500, help="rows (jobs x restarts) per forward pass")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the CPU here is shared)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-numbers", action="store_true",
                    help="also write docs/numbers/sensitivity_budget.json (the docs' numbers; not with --quick)")
    args = ap.parse_args()
    if args.write_numbers and args.quick:
        ap.error("--write-numbers writes the docs' numbers: run without --quick")
    if args.quick:
        args.units, args.images, args.eps, args.train_epochs = 1, 1, [0.5], 1
        args.budgets = args.budgets or QUICK_BUDGETS
    budgets = [parse_budget(b) for b in (args.budgets or BUDGETS)]
    default = config_default()
    if default and default not in budgets:
        budgets.append(default)
    budgets.sort(key=lambda b: (b[0] * b[1], b[0]))
    full_budget = parse_budget(args.full)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, x_test, acc = trained_resnet(args)
    images = x_test[:args.images]
    with torch.no_grad():
        clean = LayerOutput(model, LAYER)(x_test)  # (M, K): the held-out renders
    sigma = clean.std(0)
    # units that respond to every attacked image: a ReLU unit silent on an image may have no gradient there
    alive = torch.nonzero((sigma > 1e-6 * sigma.max()) & (clean[:args.images] > 0).all(0)).flatten()
    if len(alive) < args.units:
        raise SystemExit(f"only {len(alive)} {LAYER} units respond to all {args.images} images: ask for fewer")
    pick = torch.randperm(len(alive), generator=torch.Generator().manual_seed(args.seed))[:args.units]
    units = alive[pick].sort().values.tolist()
    n_triples = len(units) * len(images) * len(args.eps)
    print(f"ResNet18 (NormalizedResNet) at {args.size} px, trained {args.train_epochs} epoch(s) on {args.classes} "
          f"synthetic classes (held-out accuracy {acc:.2f}; {time.perf_counter() - t0:.0f} s)")
    print(f"layer {LAYER}, units {units} of {clean.shape[1]}, {len(images)} held-out images, L2 eps {args.eps} "
          f"-> {n_triples} (unit, image, eps) triples, both directions, schedule guo, "
          f"{torch.get_num_threads()} thread(s){' [--quick]' if args.quick else ''}")
    print(f"sigma_i over {len(x_test)} held-out images (the same for every budget, so ratios of s and s~ agree)")
    sys.stdout.flush()

    kw = dict(units=units, norm="l2", schedule="guo", directions=("up", "down"), batch_size=args.batch_size,
              sigma=sigma, progress=False)

    def run(steps: int, restarts: int, seed: int):
        t = time.perf_counter()
        res = unit_sensitivity(model, images, LAYER, args.eps, steps=steps, restarts=restarts,
                               generator=torch.Generator().manual_seed(seed), **kw)
        return res, time.perf_counter() - t

    full, t_full = run(*full_budget, seed=args.seed + 1000)
    s_full = full.per_image  # (E, U, N)
    print(f"full budget {args.full}: {full.grad_evals} gradient evaluations, {t_full:.0f} s; mean s(x, eps) per eps "
          + ", ".join(f"{e:g}: {float(s_full[i].mean()):.4g}" for i, e in enumerate(args.eps)))
    sys.stdout.flush()
    ok = s_full > 0
    if not ok.any():
        raise SystemExit("the full budget found no change for any (unit, image, eps): nothing to compare with")
    header = (f"{'budget':>9} {'grad evals':>11} {'/ full':>7} {'mean s/s_full':>14} {'min s/s_full':>13} "
              f"{'mean s / mean s_full':>21} {'time s':>7}")
    lines = [header, "-" * len(header)]
    chosen, table, default_row = None, [], None
    for k, (steps, restarts) in enumerate(budgets):
        res, t = run(steps, restarts, seed=args.seed + 1 + k)
        ratio = res.per_image[ok] / s_full[ok]
        frac_mean, frac_min = float(ratio.mean()), float(ratio.min())
        agg = float(res.per_image.mean() / s_full.mean())
        evals = res.grad_evals / full.grad_evals
        mark = " (conf default)" if default == (steps, restarts) else ""
        lines.append(f"{f'{steps}x{restarts}':>9} {res.grad_evals:>11d} {evals:>7.4f} {frac_mean:>14.4f} "
                     f"{frac_min:>13.4f} {agg:>21.4f} {t:>7.1f}{mark}")
        print(lines[-1], file=sys.stderr, flush=True)  # progress
        table.append([f"{steps}x{restarts}{mark}", res.grad_evals, round(evals, 5), round(frac_mean, 4),
                      round(frac_min, 4), round(agg, 4)])
        if default == (steps, restarts):
            default_row = {"default_mean_ratio": round(frac_mean, 4), "default_min_ratio": round(frac_min, 4),
                           "default_ratio_of_means": round(agg, 4), "default_eval_fraction": f"1/{1 / evals:.0f}"}
        if chosen is None and evals <= args.max_evals and min(frac_mean, agg) >= args.target:
            chosen = (steps, restarts, frac_mean, agg, evals)
    lines.append(f"{args.full:>9} {full.grad_evals:>11d} {1.0:>7.4f} {1.0:>14.4f} {1.0:>13.4f} {1.0:>21.4f} "
                 f"{t_full:>7.1f} (full)")
    print("\n" + "\n".join(lines))
    if chosen:
        steps, restarts, fm, agg, ev = chosen
        print(f"\ncheapest budget finding >= {args.target:.0%} of the full-budget sensitivity (mean ratio {fm:.4f}, "
              f"ratio of means {agg:.4f}) with <= {args.max_evals:g} of its gradient evaluations: {steps}x{restarts} "
              f"(steps x restarts), {ev:.4f} of the evaluations ({1 / ev:.0f}x fewer)")
    else:
        print(f"\nno budget found >= {args.target:.0%} of the full sensitivity within {args.max_evals:g} of its "
              f"gradient evaluations")
    if default:
        print(f"conf/eval/sensitivity.yaml default: steps {default[0]}, restarts {default[1]}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.write_numbers:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "numbers"))
        from _common import write_numbers

        table.append([f"{args.full} (full)", full.grad_evals, 1.0, 1.0, 1.0, 1.0])
        write_numbers("sensitivity_budget", {
            "table": {"columns": ["budget (steps x restarts)", "gradient evaluations", "/ full", "mean s / s_full",
                                  "min s / s_full", "mean s / mean s_full"], "rows": table},
            **(default_row or {}), "chosen": f"{chosen[0]}x{chosen[1]}" if chosen else "none",
            "units": len(units), "images": len(images), "eps": list(args.eps), "size": args.size, "seed": args.seed})


if __name__ == "__main__":
    main()
