"""Encoding-model fits: himalaya's torch backend against scikit-learn, and the feature cache's win.

1. Ridge: ``V`` voxels on ``N`` images x ``D`` features (planted linear responses plus noise of varied size),
   80% of the images to fit, 20% to test. neuroguide's fit (``neuroguide.models.ridge.fit_ridge``: himalaya
   ``solve_ridge_cv_svd``, torch backend, 5-fold CV, a penalty per voxel) against scikit-learn's
   ``RidgeCV(alpha_per_target=True)`` (its efficient leave-one-out mode) on the same alpha grid and the same
   standardized features, in this process. Prints the time ratio and the median and largest difference of the
   per-voxel test Pearson r.
2. Feature cache: a 3-region sweep (V1, TO, FFA; one subject; ``task=encoding``, random ResNet-18, two layers)
   run through ``neuroguide.train.run`` with ``task.feature_cache_dir`` on and off; prints both times and their
   ratio (the synthetic NSD and its regions are prepared before either is timed).

    python benchmarks/encoding_fit.py                      # small: 500 voxels x 1000 images x 256 features
    python benchmarks/encoding_fit.py --full               # 5000 voxels x 8000 images x 2048 features
    python benchmarks/encoding_fit.py --skip-cache --voxels 2000
"""
from __future__ import annotations

import argparse
import logging
import tempfile
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


def compare_ridge(n: int, d: int, v: int, backend: str) -> None:
    from sklearn.linear_model import RidgeCV

    X, Y = ridge_problem(n, d, v)
    n_fit = int(0.8 * n)
    Xf, Yf, Xt, Yt = X[:n_fit], Y[:n_fit], X[n_fit:], Y[n_fit:]
    print(f"ridge: {v} voxels, {n} images ({n_fit} fit / {n - n_fit} test) x {d} features, "
          f"{len(DEFAULT_ALPHAS)} alphas, torch threads {torch.get_num_threads()}")
    fit_ridge(Xf[:50, :10], Yf[:50, :3], cv=5, backend=backend)  # imports and backend start-up, not timed
    t = time.perf_counter()
    ours = fit_ridge(Xf, Yf, DEFAULT_ALPHAS, cv=5, backend=backend)
    t_ours = time.perf_counter() - t
    r_ours = pearson_r(torch.as_tensor(ours.predict(Xt)), torch.as_tensor(Yt, dtype=torch.float64)).numpy()

    t = time.perf_counter()
    Xs = (Xf - ours.x_mean) / ours.x_scale  # the same standardized features
    sk = RidgeCV(alphas=np.asarray(DEFAULT_ALPHAS), alpha_per_target=True, fit_intercept=True).fit(Xs, Yf)
    t_sk = time.perf_counter() - t
    pred_sk = sk.predict((Xt - ours.x_mean) / ours.x_scale)
    r_sk = pearson_r(torch.as_tensor(pred_sk, dtype=torch.float64), torch.as_tensor(Yt, dtype=torch.float64)).numpy()
    diff = np.abs(r_ours - r_sk)
    same = float(np.mean(np.isclose(ours.alphas, np.asarray(sk.alpha_, np.float64))))
    print(f"  himalaya ({backend}, 5-fold CV): {t_ours:.2f} s   scikit-learn RidgeCV (LOO): {t_sk:.2f} s   "
          f"ratio sklearn/himalaya {t_sk / t_ours:.2f}x")
    print(f"  test r: median {np.median(r_ours):.4f} vs {np.median(r_sk):.4f}; |difference| median {np.median(diff):.2e}, "
          f"largest {diff.max():.2e}; same alpha chosen for {100 * same:.0f}% of voxels")


def cache_sweep(tmp: Path, regions=("V1", "TO", "FFA")) -> None:
    from neuroguide.config import compose_config
    from neuroguide.data.nsd_regions import extract_regions, load_region
    from neuroguide.data.synthetic.nsd import write_synthetic_nsd
    from neuroguide.train import run

    small = dict(n_stimuli=900, n_subject_images=700, n_shared=100, n_repeats=3, trials_per_session=300, image_size=64)
    base = [f"paths.data_dir={tmp}/data", f"paths.log_dir={tmp}/out", "trainer.accelerator=cpu", "logger=csv",
            "callbacks=none", "task=encoding", "backbone=resnet18", "backbone.weights=random",
            "backbone.layer=[layer3,layer4]", "data.image_size=64"] + [f"data.synthetic_nsd.{k}={v}" for k, v in small.items()]
    root = write_synthetic_nsd(tmp / "data" / "synthetic" / "nsd", **small)
    extract_regions(root, 1, [load_region(r) for r in regions], cache_dir=tmp / "data" / "cache", progress=False)
    times = {}
    for label, extra in (("without cache", ["task.feature_cache_dir=null"]), ("with cache", [])):
        t = time.perf_counter()
        for r in regions:
            run(compose_config("train", base + extra + [f"region={r}"], output_dir=tmp / "out" / label / r))
        times[label] = time.perf_counter() - t
    print(f"feature cache: {len(regions)}-region sweep {times['without cache']:.1f} s without, {times['with cache']:.1f} s "
          f"with (features extracted once): {times['without cache'] / times['with cache']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="5000 voxels x 8000 images x 2048 features")
    ap.add_argument("--voxels", type=int, default=500)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--backend", default="auto", help="himalaya backend: auto (torch_cuda with a GPU) | torch")
    ap.add_argument("--skip-cache", action="store_true", help="only the ridge comparison")
    a = ap.parse_args()
    if a.full:
        a.voxels, a.images, a.features = 5000, 8000, 2048
    logging.getLogger("neuroguide").setLevel(logging.WARNING)
    compare_ridge(a.images, a.features, a.voxels, a.backend)
    if not a.skip_cache:
        with tempfile.TemporaryDirectory() as tmp:
            cache_sweep(Path(tmp))


if __name__ == "__main__":
    main()
