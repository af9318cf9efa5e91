"""Perturbation subspaces: the automatic choice of method against the explicit Jacobian, in one process.

Both sides compute the top k = 10 eigenpairs of ``J^T J`` (J the Jacobian of a K-output region response with
respect to one 64 px image, D = 3 x 64 x 64 = 12288) for a small ResNet-like CNN (timm ResNet, BasicBlock
[2, 2, 2, 2], channels 32..256, normalization first) with a linear readout to K = 500 and to K = 2000 outputs:

- auto: :func:`neuroguide.evaluation.analyses.subspace.core.perturbation_subspaces` with ``method="auto"`` (the
  method it chose is printed: ``block`` at these K, block Krylov on batched products ``J^T J V``, J never formed;
  ``explicit`` for small K);
- explicit: the full Jacobian J (K x D) from batched VJPs (``torch.func.jacrev``, i.e. ``vmap`` over ``vjp``,
  ``--chunk`` cotangents per backward pass), then ARPACK on the stored J (``J^T (J v)``: two matrix-vector
  products, a small fraction of the time; an SVD of J or the eigh of the Gram matrix J J^T cost more at K = 2000).
  As a user would write it, on the model as it is; and once more with the model's batch norms folded the way the
  library folds them for its products (``forward_mode.folded_batchnorm``, exact), so that the ratio against that
  says what the block method gains beyond the fold (the fold speeds the explicit Jacobian's VJPs too).

Time: both sides in this process on the same model and image, interleaved repeats, the minimum of each (the CPU
is shared); the eigenvalues of the two sides (max relative difference over the 10) and their subspaces (mean
squared cosine of the principal angles) are compared.

With ``--memory``, peak memory: each side once more in a fresh child process (``--child``), which builds the same
model and image, warms both methods up on a 20-output model and 16 px images, resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), records ``VmRSS`` and runs the method once; the number is the growth of the peak
resident set (``VmHWM`` after the call minus ``VmRSS`` before it).

    nice -n 10 python benchmarks/subspace.py [--outputs 500 2000] [--sizes 64] [--repeats 2] [--threads 1] [--memory]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from neuroguide.evaluation.analyses.subspace.core import perturbation_subspaces, subspace_similarity
from neuroguide.evaluation.analyses.subspace.forward_mode import folded_batchnorm
from neuroguide.models.normalize import Normalize

K_EIG = 10


def region_model(n_outputs: int, width: int = 32, seed: int = 0) -> nn.Module:
    """A ResNet-like trunk (the same weights for every n_outputs) with a linear readout to n_outputs."""
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(seed)
    trunk = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=0, channels=(width, 2 * width, 4 * width, 8 * width))
    torch.manual_seed(seed + 1)
    model = nn.Sequential(Normalize(), trunk, nn.Linear(8 * width, n_outputs)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def image(size: int, seed: int = 0, n: int = 1) -> torch.Tensor:
    """(n, 3, size, size) smooth random images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g)
    return nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def automatic(model, x, tol):
    """perturbation_subspaces(method="auto") at the n images x: eigenvalues (n, k), eigenvectors (n, D, k), the
    method chosen, products J^T J v, further VJPs and block iterations (mean over the images)."""
    s = perturbation_subspaces(model, x, k=K_EIG, layer=None, method="auto", tol=tol, progress=False)
    return (s.eigenvalues, s.eigenvectors, s.method, float(s.n_products.mean()), float(s.n_vjp.mean()),
            float(s.iterations.mean()))


def explicit(model, x, chunk, tol, times: dict | None = None):
    """Per image of x (n, 3, S, S): J from batched VJPs, then ARPACK on the explicit J^T J v = J^T (J v) (two
    matrix-vector products with the stored J: far cheaper than an SVD of J or the eigh of the K x K Gram matrix
    J J^T for large K). Returns eigenvalues (n, k), eigenvectors (n, D, k), K."""
    from scipy.sparse.linalg import LinearOperator, eigsh
    from torch.func import jacrev

    t_jac, t_solve, vals, vecs = 0.0, 0.0, [], []
    for xi in x:
        t = time.perf_counter()
        J = jacrev(lambda z: model(z[None])[0], chunk_size=chunk)(xi).reshape(-1, xi.numel())  # (K, D)
        t_jac += time.perf_counter() - t

        def mv(v, J=J):
            v = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32).reshape(J.shape[1], -1))
            return (J.T @ (J @ v)).double().numpy()

        t = time.perf_counter()
        op = LinearOperator((J.shape[1], J.shape[1]), matvec=mv, matmat=mv, dtype=np.float64)
        v0 = torch.randn(J.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
        w, V = eigsh(op, k=K_EIG, which="LA", tol=tol, v0=v0)
        order = np.argsort(w)[::-1]
        vals.append(w[order])
        vecs.append(torch.from_numpy(V[:, order].copy()).float())
        t_solve += time.perf_counter() - t
    if times is not None:
        times["jacobian"], times["solve"] = t_jac, t_solve
    return np.stack(vals), torch.stack(vecs), J.shape[0]


def status_kb(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident since the last reset) of this process, in KB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def warm_up(size: int, args) -> None:
    """Both methods once on a 20-output model: imports and lazy initialisations outside the measurements."""
    small, x = region_model(20, args.width), image(size)
    for method in ("block", "explicit"):  # the library's paths (auto picks explicit at K = 20)
        perturbation_subspaces(small, x, k=K_EIG, layer=None, method=method, tol=args.tol, progress=False)
    explicit(small, x, args.chunk, args.tol)


def child(method: str, size: int, k_out: int, args) -> None:
    """Run one method once in this fresh process; print the peak RSS growth (MB) as JSON."""
    model, x = region_model(k_out, args.width), image(size, n=args.images)
    # lazy initialisations before the baseline, on 16 px images: at the measured size the warm-up's freed buffers
    # would stay in the process (malloc keeps them) and hide the measured call's own peak
    warm_up(16, args)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = status_kb("VmRSS")
    if method == "auto":
        automatic(model, x, args.tol)
    else:
        explicit(model, x, args.chunk, args.tol)
    print(json.dumps({"peak_growth_mb": (status_kb("VmHWM") - before) / 1024}))


def peak_growth(method: str, size: int, k_out: int, args) -> float:
    cmd = [sys.executable, __file__, "--child", method, str(size), str(k_out), "--images", str(args.images), "--width",
           str(args.width), "--chunk", str(args.chunk), "--tol", str(args.tol), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["peak_growth_mb"]


def compare(size: int, k_out: int, args) -> dict:
    x = image(size, n=args.images)
    D = x[0].numel()
    model = region_model(k_out, args.width)
    t_auto, t_ex, t_exf, parts = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so a busy spell of the shared CPU hits both sides
        t = time.perf_counter()
        lam_a, P_a, method, n_prod, n_vjp, n_iter = automatic(model, x, args.tol)
        t_auto.append(time.perf_counter() - t)
        t, times = time.perf_counter(), {}
        lam_ex, P_ex, _ = explicit(model, x, args.chunk, args.tol, times)
        t_ex.append(time.perf_counter() - t)
        parts.append(times)
        with folded_batchnorm(model):
            t = time.perf_counter()
            explicit(model, x, args.chunk, args.tol)
            t_exf.append(time.perf_counter() - t)
    best = parts[int(np.argmin(t_ex))]
    rel = float(np.max(np.abs(lam_a - lam_ex) / lam_ex))  # over the images and the k eigenvalues
    sim = float(subspace_similarity(P_a, P_ex).min())  # the worst image
    ratio = min(t_ex) / min(t_auto)
    n = args.images
    print(f"\n{size} px (D = {D}), K = {k_out} outputs (J: {k_out} x {D} = {k_out * D * 4 / 2**20:.0f} MB in float32), "
          f"{n} image(s)")
    print(f"  auto -> method {method} (per image {n_prod:.0f} products J^T J v + {n_vjp:.0f} VJPs, {n_iter:.1f} block "
          f"iterations, tol {args.tol:g}): {min(t_auto):7.2f} s")
    print(f"  explicit ({n} x {k_out} VJPs, chunks of {args.chunk}: {best['jacobian']:.2f} s; eigsh on J: "
          f"{best['solve']:.2f} s): {min(t_ex):7.2f} s")
    print(f"  ratio explicit / auto: {ratio:.2f}x (repeats: auto {np.round(t_auto, 2).tolist()} s, explicit "
          f"{np.round(t_ex, 2).tolist()} s)")
    print(f"  explicit with the batch norms folded as the library folds them: {min(t_exf):7.2f} s; ratio to auto "
          f"{min(t_exf) / min(t_auto):.2f}x (what the block method gains beyond the fold)")
    print(f"  top eigenvalues {np.array2string(lam_a[0, :3], precision=5)} (auto) vs "
          f"{np.array2string(lam_ex[0, :3], precision=5)} (explicit, image 0); max relative difference over the {K_EIG}"
          f"{' and the images' if n > 1 else ''}: "
          f"{rel:.2e}; subspace similarity (worst image) {sim:.6f} -> same: {'yes' if rel < 1e-4 and sim > 0.999 else 'NO'}")
    row = {"size": size, "K": k_out, "images": n, "t_auto": t_auto, "t_ex": t_ex, "t_exf": t_exf, "rel": rel, "sim": sim, "method": method,
           "products": n_prod, "vjps": n_vjp}
    if args.memory:
        row["m_auto"], row["m_ex"] = peak_growth("auto", size, k_out, args), peak_growth("explicit", size, k_out, args)
        print(f"  peak RSS growth: auto {row['m_auto']:.1f} MB, explicit {row['m_ex']:.1f} MB")
    return row


def write_numbers_file(rows: list[dict]) -> None:
    """docs/numbers/subspace.json: per (size, K) the times as mean +- sd over the repeats, memory, agreement."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "numbers"))
    from _common import summary, write_numbers

    table = []
    for r in rows:
        ratio = [e / a for e, a in zip(r["t_ex"], r["t_auto"])]
        ratio_f = [e / a for e, a in zip(r["t_exf"], r["t_auto"])]
        table.append([f"{r['size']} px", r["K"], r["images"], r["method"], summary(r["t_auto"], 2), summary(r["t_ex"], 2),
                      summary(ratio, 1), summary(r["t_exf"], 2), summary(ratio_f, 1), f"{r['rel']:.1e}", round(r["sim"], 6), f"{r['products']:.0f} + {r['vjps']:.0f}"])
    write_numbers("subspace", {"table": {
        "columns": ["image", "K outputs", "images", "auto's method", "auto s", "explicit s", "explicit / auto",
                    "explicit, BN folded s", "folded explicit / auto", "max rel. eigenvalue diff.",
                    "subspace similarity", "products J^T J v + VJPs"],
        "rows": table}, "repeats": len(rows[0]["t_auto"]) if rows else 0})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outputs", type=int, nargs="+", default=[500, 2000])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--images", type=int, default=1,
                    help="images per measurement (auto's block method solves them together; explicit: one by one)")
    ap.add_argument("--chunk", type=int, default=100, help="cotangents per batched VJP of the explicit Jacobian")
    ap.add_argument("--tol", type=float, default=1e-4,
                    help="relative residual ||J^T J v - lam v|| / lam (auto's solver and the explicit side's ARPACK)")
    ap.add_argument("--memory", action="store_true", help="also the peak RSS growth of each side (fresh processes)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared CPU is less noisy)")
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "SIZE", "K"), help=argparse.SUPPRESS)
    ap.add_argument("--write-numbers", action="store_true",
                    help="also write docs/numbers/subspace.json (times as mean +- sd over >= 3 --repeats)")
    args = ap.parse_args()
    if args.write_numbers and args.repeats < 3:
        ap.error("--write-numbers reports times over repeats: give --repeats 3 or more")
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child[0], int(args.child[1]), int(args.child[2]), args)
    print(f"top-{K_EIG} eigenpairs of J^T J at one image, ResNet-like CNN (width {args.width}, BasicBlock [2, 2, 2, 2]) "
          f"+ linear readout to K outputs; {torch.get_num_threads()} torch thread(s); times: minimum of "
          f"{args.repeats} interleaved repeats")
    rows = []
    for size in args.sizes:
        warm_up(size, args)
        for k_out in args.outputs:
            rows.append(compare(size, k_out, args))
    if args.write_numbers:
        write_numbers_file(rows)


if __name__ == "__main__":
    main()
