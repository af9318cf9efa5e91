"""Perturbation subspaces: matrix-free top-k eigenpairs of J^T J against the best explicit method.

Both sides compute the top k = 10 eigenpairs of ``J^T J`` (J the Jacobian of a K-output region response with
respect to one 64 px image, D = 3 x 64 x 64 = 12288) for a small ResNet-like CNN (timm ResNet, BasicBlock
[2, 2, 2, 2], channels 32..256, normalization first) with a linear readout to K = 500 and to K = 2000 outputs:

- matrix-free: :func:`neuroguide.evaluation.analyses.subspace.core.perturbation_subspaces` (ARPACK ``eigsh``; each product
  ``J^T J v`` is one JVP and one VJP; J is never formed);
- explicit: the full Jacobian J (K x D) from batched VJPs (``torch.func.jacrev``, i.e. ``vmap`` over ``vjp``,
  ``--chunk`` cotangents per backward pass), then ARPACK on the stored J (``J^T (J v)``: two matrix-vector
  products, a small fraction of the time; an SVD of J or the eigh of the Gram matrix J J^T cost more at K = 2000).

Time: both sides in this process on the same model and image, interleaved repeats, the minimum of each (the CPU
is shared); the eigenvalues of the two sides and their subspaces are compared.

Peak memory: each side once more in a fresh child process (``--child``), which builds the same model and image,
warms both methods up on a 20-output model and 16 px images, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``),
records ``VmRSS`` and runs the method once; the number is the growth of the peak resident set (``VmHWM`` after the
call minus ``VmRSS`` before it): every byte the call needed at its peak, torch's CPU allocator included
(``tracemalloc`` does not see it), the model's own weights excluded.

    nice -n 10 python benchmarks/subspace.py [--outputs 500 2000] [--sizes 64 128] [--repeats 2] [--threads 1]
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


def image(size: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, size, size) smooth random image in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, size // 8, size // 8, generator=g)
    return nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def matrix_free(model, x, tol):
    s = perturbation_subspaces(model, x, k=K_EIG, layer=None, method="eigsh", tol=tol, progress=False)
    return s.eigenvalues[0], s.eigenvectors[0], int(s.n_products[0])


def explicit(model, x, chunk, tol, times: dict | None = None):
    """J from batched VJPs, then ARPACK on the explicit J^T J v = J^T (J v) (two matrix-vector products with
    the stored J: far cheaper than an SVD of J or the eigh of the K x K Gram matrix J J^T for large K)."""
    from scipy.sparse.linalg import LinearOperator, eigsh
    from torch.func import jacrev

    t = time.perf_counter()
    J = jacrev(lambda z: model(z[None])[0], chunk_size=chunk)(x[0]).reshape(-1, x[0].numel())  # (K, D)
    t_jac = time.perf_counter() - t

    def mv(v):
        v = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32).reshape(J.shape[1], -1))
        return (J.T @ (J @ v)).double().numpy()

    op = LinearOperator((J.shape[1], J.shape[1]), matvec=mv, matmat=mv, dtype=np.float64)
    v0 = torch.randn(J.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    w, V = eigsh(op, k=K_EIG, which="LA", tol=tol, v0=v0)
    order = np.argsort(w)[::-1]
    if times is not None:
        times["jacobian"] = t_jac
        times["solve"] = time.perf_counter() - t - t_jac
    return w[order], torch.from_numpy(V[:, order].copy()).float(), J.shape[0]


def status_kb(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident since the last reset) of this process, in KB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def warm_up(size: int, args) -> None:
    """Both methods once on a 20-output model: imports and lazy initialisations outside the measurements."""
    small, x = region_model(20, args.width), image(size)
    matrix_free(small, x, args.tol)
    explicit(small, x, args.chunk, args.tol)


def child(method: str, size: int, k_out: int, args) -> None:
    """Run one method once in this fresh process; print the peak RSS growth (MB) as JSON."""
    model, x = region_model(k_out, args.width), image(size)
    # lazy initialisations before the baseline, on 16 px images: at the measured size the warm-up's freed buffers
    # would stay in the process (malloc keeps them) and hide the measured call's own peak
    warm_up(16, args)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = status_kb("VmRSS")
    if method == "matrix_free":
        matrix_free(model, x, args.tol)
    else:
        explicit(model, x, args.chunk, args.tol)
    print(json.dumps({"peak_growth_mb": (status_kb("VmHWM") - before) / 1024}))


def peak_growth(method: str, size: int, k_out: int, args) -> float:
    cmd = [sys.executable, __file__, "--child", method, str(size), str(k_out), "--width",
           str(args.width), "--chunk", str(args.chunk), "--tol", str(args.tol), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["peak_growth_mb"]


def compare(size: int, k_out: int, args) -> dict:
    x = image(size)
    D = x.numel()
    model = region_model(k_out, args.width)
    t_mf, t_ex, parts = [], [], []
    for _ in range(args.repeats):  # interleaved, so a busy spell of the shared CPU hits both sides
        t = time.perf_counter()
        lam_mf, P_mf, n_prod = matrix_free(model, x, args.tol)
        t_mf.append(time.perf_counter() - t)
        t, times = time.perf_counter(), {}
        lam_ex, P_ex, _ = explicit(model, x, args.chunk, args.tol, times)
        t_ex.append(time.perf_counter() - t)
        parts.append(times)
    best = parts[int(np.argmin(t_ex))]
    rel = float(np.max(np.abs(lam_mf - lam_ex) / lam_ex))
    sim = float(subspace_similarity(P_mf, P_ex))
    m_mf, m_ex = peak_growth("matrix_free", size, k_out, args), peak_growth("explicit", size, k_out, args)
    print(f"\n{size} px (D = {D}), K = {k_out} outputs (J: {k_out} x {D} = {k_out * D * 4 / 2**20:.0f} MB in float32)")
    print(f"  matrix-free (eigsh, {n_prod} products J^T J v = {n_prod} JVPs + {n_prod} VJPs): {min(t_mf):7.2f} s, "
          f"peak RSS growth {m_mf:7.1f} MB")
    print(f"  explicit ({k_out} VJPs, chunks of {args.chunk}: {best['jacobian']:.2f} s; eigsh on J: "
          f"{best['solve']:.2f} s):{' ' * 8}{min(t_ex):7.2f} s, peak RSS growth {m_ex:7.1f} MB")
    print(f"  ratio explicit / matrix-free: time {min(t_ex) / min(t_mf):.1f}x, peak memory {m_ex / max(m_mf, 1e-9):.1f}x")
    print(f"  top eigenvalues {np.array2string(lam_mf[:3], precision=5)} (matrix-free) vs "
          f"{np.array2string(lam_ex[:3], precision=5)} (explicit); max relative difference over the {K_EIG}: "
          f"{rel:.2e}; subspace similarity {sim:.6f} -> same: {'yes' if rel < 1e-3 and sim > 0.999 else 'NO'}")
    return {"size": size, "K": k_out, "t_mf": t_mf, "t_ex": t_ex, "m_mf": m_mf, "m_ex": m_ex, "rel": rel, "sim": sim,
            "products": n_prod}


def write_numbers_file(rows: list[dict]) -> None:
    """docs/numbers/subspace.json: per (size, K) the times as mean +- sd over the repeats, memory, agreement."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "numbers"))
    from _common import summary, write_numbers

    table = []
    for r in rows:
        ratio = [e / m for e, m in zip(r["t_ex"], r["t_mf"])]
        table.append([f"{r['size']} px", r["K"], summary(r["t_mf"], 2), summary(r["t_ex"], 2), summary(ratio, 1),
                      round(r["m_mf"], 1), round(r["m_ex"], 1), f"{r['rel']:.1e}", round(r["sim"], 6), r["products"]])
    write_numbers("subspace", {"table": {
        "columns": ["image", "K outputs", "matrix-free s", "explicit s", "explicit / matrix-free", "matrix-free MB",
                    "explicit MB", "max rel. eigenvalue diff.", "subspace similarity", "products J^T J v"],
        "rows": table}, "repeats": len(rows[0]["t_mf"]) if rows else 0})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outputs", type=int, nargs="+", default=[500, 2000])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=100, help="cotangents per batched VJP of the explicit Jacobian")
    ap.add_argument("--tol", type=float, default=1e-5, help="eigsh tolerance (relative accuracy of eigenvalues)")
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
          f"{args.repeats} interleaved repeats; memory: peak RSS growth of one call in a fresh process")
    rows = []
    for size in args.sizes:
        warm_up(size, args)
        for k_out in args.outputs:
            rows.append(compare(size, k_out, args))
    if args.write_numbers:
        write_numbers_file(rows)


if __name__ == "__main__":
    main()
