"""The L2 step's exact projection onto ball ∩ box against the naive one (radial rescaling, then clipping).

Both run in this process on the same data:

1. **Optimality.** A linear unit ``h(x) = w.x`` on images with a fraction ``--edge`` of the pixels at 0 or 1,
   where ``max w.d`` over ``{||d||_2 <= eps} ∩ {0 <= x + d <= 1}`` is known (``d_j = clip(lambda w_j, -x_j,
   1 - x_j)``, lambda by bisection in float64). Prints the fraction of that optimum each side's PGD reaches
   (the lowest over rows), for plain PGD (step eps/2 and Madry's default 2.5 eps / steps) and the Guo
   schedule.
2. **Cost.** Time of one step + projection of a (batch, 3, size, size) batch (from a random start, along
   the ResNet18 gradient, on images with ``--edge`` pixels at 0 or 1), and, for scale, of one forward +
   backward of a ResNet18 on the same batch (the rest of a PGD iteration). Minimum of interleaved repeats
   (the CPU is shared). Also prints how many Newton iterations the exact projection took.

    python benchmarks/l2_box_projection.py [--batch 32] [--size 224] [--edge 0.1] [--eps 1.0] [--step 0.25]
                                          [--repeats 5] [--skip-optimality] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from neuroguide.attacks import objectives, pgd_attack, steps as steps_mod
from neuroguide.attacks.steps import L2Step, _TINY


class NaiveL2Step(L2Step):
    """The former L2 step: rescale ``d`` into the ball, then clip to [0, 1]; step along the full gradient."""

    def project(self, x):
        d = x - self.orig_input
        n = d.flatten(1).norm(dim=1).reshape(-1, *([1] * (d.ndim - 1)))
        return self.clip(self.orig_input + d * torch.clamp(self._eps() / (n + _TINY), max=1.0))

    def step(self, x, grad):
        gn = grad.flatten(1).norm(dim=1).reshape(-1, *([1] * (grad.ndim - 1)))
        return x + self._alpha() * grad / (gn + _TINY)


def edge_images(n, shape, frac, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.4 * torch.rand((n, *shape), generator=g)
    at_edge = torch.rand((n, *shape), generator=g) < frac
    return torch.where(at_edge, (torch.rand((n, *shape), generator=g) < 0.5).to(x.dtype), x)


def box_optimum_l2(w, x, eps, iters=200):
    out = []
    w = w.double().flatten()
    for xb in x.double().flatten(1):
        d = lambda lam: torch.clamp(lam * w, -xb, 1 - xb)  # noqa: E731, B023  (used within the iteration)
        a, b = 0.0, 1.0
        while d(b).norm() < eps and b < 1e12:
            b *= 2
        for _ in range(iters):
            m = (a + b) / 2
            a, b = (m, b) if d(m).norm() < eps else (a, m)
        out.append(float(d(b if d(b).norm() <= eps else a) @ w))
    return torch.tensor(out, dtype=torch.float64)


def with_step(cls):
    """Run pgd_attack with ``cls`` as the L2 step."""
    orig = steps_mod.STEPS["l2"]
    steps_mod.STEPS["l2"] = cls
    return orig


def optimality(edge: float):
    torch.manual_seed(0)
    shape = (3, 6, 6)
    model = nn.Sequential(nn.Flatten(), nn.Linear(108, 3))
    w = model[1].weight.detach()
    x = edge_images(4, shape, edge)
    rows = torch.arange(4)
    print(f"fraction of the box optimum reached (linear unit, {shape} images, {edge:.0%} pixels at 0 or 1; "
          "lowest over 4 images x 3 units x 2 directions)")
    print(f"{'eps':>5} {'budget':>26} {'naive':>8} {'exact':>8}")
    for eps in (0.5, 2.0):
        for schedule, n, ss in (("pgd", 30, eps / 2), ("pgd", 10, None), ("guo", 16, None), ("guo", 24, None)):
            fr = {}
            for name, cls in (("naive", NaiveL2Step), ("exact", L2Step)):
                orig = with_step(cls)
                try:
                    worst = 1.0
                    for unit in range(3):
                        for direction, sign in (("up", 1.0), ("down", -1.0)):
                            best = box_optimum_l2(sign * w[unit], x, eps)
                            obj = objectives.Unit(unit, direction)
                            res = pgd_attack(model, x, obj, eps=eps, norm="l2", steps=n, schedule=schedule,
                                             step_size=ss, generator=torch.Generator().manual_seed(0))
                            gain = (res.value - obj(model(x), rows).detach()).double()
                            worst = min(worst, float((gain / best).min()))
                    fr[name] = worst
                finally:
                    steps_mod.STEPS["l2"] = orig
            budget = f"{schedule} {n} steps, " + ("step eps/2" if ss else "default step")
            print(f"{eps:>5} {budget:>26} {fr['naive']:>8.4f} {fr['exact']:>8.4f}")


def cost(args):
    from neuroguide.models.resnet import NormalizedResNet

    dev = torch.device(args.device)
    torch.manual_seed(0)
    x0 = edge_images(args.batch, (3, args.size, args.size), args.edge).to(dev)
    model = NormalizedResNet("resnet18", 10).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    x = L2Step(x0, args.eps, 0.25 * args.eps).random_perturb(x0, torch.Generator(device="cpu").manual_seed(0))
    xg = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(xg), y), xg)
    exact, naive = L2Step(x0, args.eps, args.step * args.eps), NaiveL2Step(x0, args.eps, args.step * args.eps)
    v_exact = exact.step(x, g)

    # Newton iterations the exact projection takes on this batch: the fewest after which it no longer changes
    full = exact.project(v_exact)
    orig_max, need = steps_mod.L2_BOX_MAX_ITER, None
    try:
        for k in range(1, orig_max + 1):
            steps_mod.L2_BOX_MAX_ITER = k
            if torch.equal(exact.project(v_exact), full):
                need = k
                break
    finally:
        steps_mod.L2_BOX_MAX_ITER = orig_max
    ratio_eps = (full - x0).flatten(1).norm(dim=1) / args.eps
    rows_on_sphere = int((ratio_eps > 1 - 1e-5).sum())

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    def fwd_bwd():
        xg = x.detach().requires_grad_(True)
        torch.autograd.grad(nn.functional.cross_entropy(model(xg), y), xg)

    times = {"naive step + projection": [], "exact step + projection": [], "ResNet18 forward+backward": []}
    fns = {"naive step + projection": lambda: naive.project(naive.step(x, g)),
           "exact step + projection": lambda: exact.project(exact.step(x, g)), "ResNet18 forward+backward": fwd_bwd}
    for fn in fns.values():
        fn()  # warm up
    for _ in range(args.repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    t = {k: min(v) for k, v in times.items()}
    print(f"\ncost on {args.batch} x 3 x {args.size} x {args.size}, {args.edge:.0%} pixels at 0 or 1, eps {args.eps}, "
          f"{dev.type} ({torch.get_num_threads()} threads), min of {args.repeats}")
    for k, v in t.items():
        print(f"  {k:<28} {1e3 * v:9.2f} ms")
    ratio = t["exact step + projection"] / t["naive step + projection"]
    print(f"  exact / naive step + projection {ratio:9.2f} x")
    base = t["ResNet18 forward+backward"] + t["naive step + projection"]
    extra = (t["exact step + projection"] - t["naive step + projection"]) / base
    print(f"  extra cost per PGD iteration    {100 * extra:9.2f} % (of forward+backward + naive step and projection)")
    print(f"  Newton iterations of the exact projection: {need} (rows on the sphere ||d|| = eps: {rows_on_sphere} "
          f"of {args.batch}; the others have clip(v) inside the ball)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--edge", type=float, default=0.1, help="fraction of pixels at 0 or 1 in the cost test")
    ap.add_argument("--eps", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--step", type=float, default=0.25, help="step size in units of eps")
    ap.add_argument("--skip-optimality", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if not args.skip_optimality:
        optimality(0.5)
    cost(args)


if __name__ == "__main__":
    main()
