"""Encoding-model ridge: neuroguide's exact leave-one-out fit against scikit-learn's RidgeCV, in one process.

``V`` voxels on ``N`` images x ``D`` features (planted linear responses plus noise of varied size), 80% of the
images to fit, 20% to test. neuroguide's fit (``neuroguide.models.ridge.fit_ridge``: one eigendecomposition, every
penalty's exact leave-one-out error in closed form, a penalty per voxel; torch, float32 residuals for float32
features) against scikit-learn's ``RidgeCV(alpha_per_target=True)`` (its efficient leave-one-out mode, float64) on the
same alpha grid and the same standardized features, back to back. The last line is the summary:
``ridge vs scikit-learn RidgeCV: <ratio>x faster, median |dr| <d>, largest |dr| <d>`` (ratio = scikit-learn's time /
neuroguide's; dr = the difference of a voxel's test Pearson r).

    python benchmarks/encoding_fit.py                                        # 500 voxels x 1000 images x 256 features
    python benchmarks/encoding_fit.py --voxels 2000 --images 4000 --features 1024
    python benchmarks/encoding_fit.py --full                                 # 5000 voxels x 8000 images x 2048 features
    python benchmarks/encoding_fit.py --full --chunks 5                      # in 5 parts of 1000 voxels, each side
    python benchmarks/encoding_fit.py --dtype float64                        # float64 residuals (slower, for comparison)

The feature cache and several regions in one fit: ``benchmarks/encoding_regions.py``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from neuroguide.metrics import pearson_r
from neuroguide.models.ridge import DEFAULT_ALPHAS, fit_ridge


def ridge_problem(n: int, d: int, v: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    k = min(d, 64)  # responses live in a low-dimensional part of the feature space, as voxels do
    basis = rng.normal(size=(k, d)).astype(np.float32)
    X = (rng.normal(size=(n, k)).astype(np.float32) @ basis + rng.normal(size=(n, d)).astype(np.float32))
    W = rng.normal(size=(d, v)).astype(np.float32) / np.sqrt(d)
    noise = np.geomspace(0.2, 5, v).astype(np.float32) * (X @ W).std()
    Y = X @ W + rng.normal(size=(n, v)).astype(np.float32) * noise
    return X, Y


def _r(pred, y) -> np.ndarray:
    return pearson_r(torch.as_tensor(pred, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)).numpy()


def compare_ridge(n: int, d: int, v: int, device: str, dtype: torch.dtype | None, repeat: int = 1,
                  chunks: int = 1) -> tuple[str, dict]:
    from sklearn.linear_model import RidgeCV

    X, Y = ridge_problem(n, d, v)
    n_fit = int(0.8 * n)
    Xf, Yf, Xt, Yt = X[:n_fit], Y[:n_fit], X[n_fit:], Y[n_fit:]
    del X, Y
    parts = np.array_split(np.arange(v), chunks)  # each part an independent problem (its own decomposition), both sides
    print(f"ridge: {v} voxels, {n} images ({n_fit} fit / {n - n_fit} test) x {d} features, "
          f"{len(DEFAULT_ALPHAS)} alphas, torch threads {torch.get_num_threads()}, device {device}"
          + (f", {chunks} parts of {len(parts[0])} voxels fitted one after the other by each side" if chunks > 1 else ""))
    fit_ridge(Xf[:50, :10], Yf[:50, :3], device=device, dtype=dtype)  # imports and start-up, not timed
    RidgeCV(alphas=np.asarray(DEFAULT_ALPHAS), alpha_per_target=True).fit(Xf[:50, :10], Yf[:50, :3])
    mean, scale = Xf.mean(0, dtype=np.float64), Xf.std(0, dtype=np.float64)
    Xs = ((Xf - mean) / scale).astype(np.float32)  # the same standardized features for scikit-learn (not timed)
    Xts = ((Xt - mean) / scale).astype(np.float32)
    t_ours, t_sk = [], []
    for _ in range(repeat):  # interleaved, so that a burst of load on a shared machine hits both sides alike
        t = time.perf_counter()
        ours = [fit_ridge(Xf, Yf[:, p], DEFAULT_ALPHAS, device=device, dtype=dtype) for p in parts]
        t_ours.append(time.perf_counter() - t)
        pred_ours, alpha_ours = np.hstack([f.predict(Xt) for f in ours]), np.hstack([f.alphas for f in ours])
        del ours
        t = time.perf_counter()
        sk = [RidgeCV(alphas=np.asarray(DEFAULT_ALPHAS), alpha_per_target=True, fit_intercept=True).fit(Xs, Yf[:, p])
              for p in parts]
        t_sk.append(time.perf_counter() - t)
        pred_sk, alpha_sk = np.hstack([m.predict(Xts) for m in sk]), np.hstack([m.alpha_ for m in sk])
        del sk
    times = f" (fastest of {', '.join(f'{a:.1f}/{b:.1f}' for a, b in zip(t_ours, t_sk))} s)" if repeat > 1 else ""
    t_ours, t_sk = min(t_ours), min(t_sk)
    r_ours, r_sk = _r(pred_ours, Yt), _r(pred_sk, Yt)
    diff = np.abs(r_ours - r_sk)
    same = float(np.mean(np.isclose(alpha_ours, np.asarray(alpha_sk, np.float64))))
    name = {None: "float32", torch.float32: "float32", torch.float64: "float64"}[dtype]
    print(f"  neuroguide (exact LOO, {name} residuals): {t_ours:.2f} s   scikit-learn RidgeCV (LOO, float64): "
          f"{t_sk:.2f} s{times}")
    print(f"  test r: median {np.median(r_ours):.4f} vs {np.median(r_sk):.4f}; same alpha chosen for "
          f"{100 * same:.1f}% of voxels")
    summary = (f"ridge vs scikit-learn RidgeCV: {t_sk / t_ours:.2f}x faster, median |dr| {np.median(diff):.1e}, "
               f"largest |dr| {diff.max():.1e}")
    values = {"voxels": v, "images": n, "features": d, "threads": torch.get_num_threads(), "device": device,
              "residuals": name, "ours_s": t_ours, "sklearn_s": t_sk, "ratio": t_sk / t_ours,
              "median_abs_dr": float(np.median(diff)), "max_abs_dr": float(diff.max()),
              "same_alpha_fraction": same, "median_r": float(np.median(r_ours))}
    return summary, values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="5000 voxels x 8000 images x 2048 features")
    ap.add_argument("--voxels", type=int, default=500)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--device", default="cpu", help="where neuroguide's ridge runs: cpu (default) | cuda | auto")
    ap.add_argument("--repeat", type=int, default=1, help="fits of each side, interleaved; the fastest of each counts")
    ap.add_argument("--chunks", type=int, default=1,
                    help="fit the voxels in this many independent parts, each side (bounds scikit-learn's memory, "
                         "~2 GB at the full size in one part)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads of both sides (torch and numpy's BLAS); default: torch's")
    ap.add_argument("--write-numbers", action="store_true",
                    help="write docs/numbers/encoding_fit_<voxels>x<images>x<features>.json (the Benchmarks page)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "float64"),
                    help="neuroguide's residuals: auto (the features' float32) | float32 | float64")
    a = ap.parse_args()
    if a.full:
        a.voxels, a.images, a.features = 5000, 8000, 2048
    logging.getLogger("neuroguide").setLevel(logging.WARNING)
    dtype = None if a.dtype == "auto" else getattr(torch, a.dtype)
    from threadpoolctl import threadpool_limits

    threads = a.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    with threadpool_limits(threads):  # scikit-learn's BLAS: as many threads as torch
        summary, values = compare_ridge(a.images, a.features, a.voxels, a.device, dtype, a.repeat, a.chunks)
    if a.write_numbers:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "numbers"))
        from _common import write_numbers

        write_numbers(f"encoding_fit_{a.voxels}x{a.images}x{a.features}", values)
    print(summary)


if __name__ == "__main__":
    main()
