"""Unit sensitivity with units x directions x restarts x images stacked in one batch, against a loop
over units one at a time (each unit's directions x restarts x images batched), same attack budget.

Both sides run in this process on the same small ResNet18-like model (timm ResNet, BasicBlock
[2, 2, 2, 2], narrow channels, normalization first), the same images and the same schedule and
steps; the script prints both times (minimum of interleaved repeats: the CPU is shared), the ratio,
the gradient evaluations of each side and how far the mean sensitivity s(eps) of the two sides
differs (the random starts differ, so they agree within a tolerance, not bit for bit).

What batching buys depends on how many rows one unit has on its own (2 directions x restarts x
images): on a CPU the cost per row falls with the batch only up to a few dozen rows, so the gain is
largest when each unit has few rows. The script runs one configuration per ``--configs`` entry
(images x restarts) and prints the ratio of each.

    python benchmarks/unit_sensitivity.py [--units 32] [--configs 1x1 2x1 2x2 4x2] [--size 32] [--steps 10]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from neuroguide.evaluation.analyses.sensitivity.core import unit_sensitivity
from neuroguide.models.features import LayerOutput
from neuroguide.models.normalize import Normalize

LAYER = "1.global_pool"  # the penultimate features


def small_resnet(width: int, seed: int = 0) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(seed)
    channels = (width, 2 * width, 4 * width, 8 * width)
    return nn.Sequential(Normalize(), ResNet(BasicBlock, [2, 2, 2, 2], num_classes=10, channels=channels)).eval()


def compare(model, x, units, eps, restarts, sigma, args) -> tuple[float, bool]:
    kw = dict(norm="l2", restarts=restarts, steps=args.steps, schedule=args.schedule, batch_size=args.batch_size,
              sigma=sigma, progress=False)

    def run_batched(seed):
        return unit_sensitivity(model, x, LAYER, eps, units=units, generator=torch.Generator().manual_seed(seed), **kw)

    def run_loop(seed):
        g = torch.Generator().manual_seed(seed)
        return [unit_sensitivity(model, x, LAYER, eps, units=[u], generator=g, **kw) for u in units]

    t_batched, t_loop = [], []
    for rep in range(args.repeats):  # interleaved, so a busy spell of the shared CPU hits both sides
        t = time.perf_counter()
        batched = run_batched(1 + rep)
        t_batched.append(time.perf_counter() - t)
        t = time.perf_counter()
        looped = run_loop(100 + rep)
        t_loop.append(time.perf_counter() - t)
    tb, tl = min(t_batched), min(t_loop)
    s_loop = torch.cat([r.s for r in looped], dim=1)  # (E, U)
    per_unit = 2 * restarts * len(x) * len(eps)
    rows = per_unit * len(units)
    rel = float((batched.s.mean() - s_loop.mean()).abs() / s_loop.mean())
    ok = rel <= args.tolerance
    print(f"\n{len(units)} units x 2 directions x {restarts} restarts x {len(x)} images x {len(eps)} eps = {rows} rows "
          f"({per_unit} per unit)")
    print(f"  batched, batches of {min(args.batch_size, rows)} rows: {tb:7.2f} s, {batched.grad_evals} row-gradient "
          f"evaluations")
    print(f"  loop over units, {per_unit} rows a call:    {tl:7.2f} s, {sum(r.grad_evals for r in looped)} "
          f"row-gradient evaluations")
    print(f"  ratio loop / batched: {tl / tb:.2f}x")
    print(f"  mean s(eps): batched {batched.s.mean():.4f}, loop {s_loop.mean():.4f}, relative difference {rel:.4f} "
          f"-> same within {args.tolerance}: {'yes' if ok else 'NO'}")
    return tl / tb, ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=32)
    ap.add_argument("--configs", nargs="+", default=["1x1", "2x1", "2x2", "4x2"], help="IMAGESxRESTARTS entries")
    ap.add_argument("--size", type=int, default=32, help="image size in px")
    ap.add_argument("--width", type=int, default=16, help="channels of the first stage (ResNet18: 64)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.5])
    ap.add_argument("--schedule", default="guo", choices=["guo", "pgd"])
    ap.add_argument("--batch-size", type=int, default=128, help="rows per forward pass (both sides)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the CPU here is shared)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per side, interleaved; the min counts")
    ap.add_argument("--tolerance", type=float, default=0.10, help="allowed relative difference of the mean s(eps)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = small_resnet(args.width)
    units = list(range(args.units))
    print(f"ResNet18-like (width {args.width}) at {args.size} px, layer {LAYER}, {args.steps} steps, schedule "
          f"{args.schedule}, L2 eps {args.eps}, {torch.get_num_threads()} thread(s), min of {args.repeats} repeats")
    x_all = torch.rand(8, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # sigma_i from 8 clean images, so that a configuration may attack a single image
        sigma = LayerOutput(model, LAYER)(x_all).std(0)
    unit_sensitivity(model, x_all[:2], LAYER, args.eps, units=units[:2], steps=2, progress=False)  # warm up
    results = []
    for cfg in args.configs:
        n_img, restarts = (int(v) for v in cfg.lower().split("x"))
        results.append(compare(model, x_all[:n_img], units, args.eps, restarts, sigma, args))
    print("\nratio loop / batched per configuration: "
          + ", ".join(f"{c}: {r:.2f}x" for c, (r, _) in zip(args.configs, results)))
    if not all(ok for _, ok in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
