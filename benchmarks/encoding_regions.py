"""Encoding models of several regions of one subject: one run for all (``task.regions``) against a run per region.

1. Ridge alone: three regions of ``V`` voxels each on ``N`` images x ``D`` features, fitted in one
   ``fit_ridge`` (one decomposition) against three fits (one each); the predictions are the same.
2. The whole pipeline (``neuroguide.train.run``, ``task=encoding``, random ResNet-18, two layers) on the
   embedded synthetic NSD for V1, TO and FFA of one subject: one run ``task.regions=[V1,TO,FFA]`` against three
   runs ``region=<r>``, the latter with the feature cache on (the features extracted once, then read back) and off.
   Each variant starts from an empty feature cache; the synthetic NSD and its regions are prepared before any is
   timed; ``--repeat`` rounds run the variants interleaved and keep each one's fastest (the machine may be shared).

    python benchmarks/encoding_regions.py                     # ridge 3 x 1000 voxels x 4000 images x 1024 features
    python benchmarks/encoding_regions.py --skip-pipeline --voxels 2000
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from encoding_fit import ridge_problem
from neuroguide.models.ridge import DEFAULT_ALPHAS, fit_ridge


def ridge_regions(n: int, d: int, v: int, k: int = 3) -> dict:
    X, Y = ridge_problem(n, d, k * v)
    fit_ridge(X[:50, :10], Y[:50, :3], device="cpu")  # start-up, not timed
    t = time.perf_counter()
    joint = fit_ridge(X, Y, DEFAULT_ALPHAS, device="cpu")
    t_joint = time.perf_counter() - t
    t = time.perf_counter()
    alone = [fit_ridge(X, Y[:, i * v:(i + 1) * v], DEFAULT_ALPHAS, device="cpu") for i in range(k)]
    t_alone = time.perf_counter() - t
    diff = max(np.abs(joint.columns(slice(i * v, (i + 1) * v)).predict(X) - a.predict(X)).max()
               for i, a in enumerate(alone))
    print(f"ridge: {k} regions x {v} voxels, {n} images x {d} features: one fit {t_joint:.2f} s, {k} fits "
          f"{t_alone:.2f} s: {t_alone / t_joint:.2f}x (largest prediction difference {diff:.1e})")
    return {"ridge": {"regions": k, "voxels": v, "images": n, "features": d, "one_fit_s": t_joint,
                      "separate_fits_s": t_alone, "ratio": t_alone / t_joint, "max_prediction_diff": float(diff)}}


def pipeline(tmp: Path, regions=("V1", "TO", "FFA"), repeat: int = 1) -> dict:
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
    times: dict[str, list[float]] = {"off": [], "on": [], "together": []}
    for i in range(repeat):  # interleaved, each from an empty feature cache and fresh run folders
        t = time.perf_counter()
        for r in regions:
            run(compose_config("train", base + ["task.feature_cache_dir=null", f"region={r}"],
                               output_dir=tmp / "out" / f"off{i}" / r))
        times["off"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for r in regions:
            run(compose_config("train", base + [f"task.feature_cache_dir={tmp / 'features' / str(i)}", f"region={r}"],
                               output_dir=tmp / "out" / f"on{i}" / r))
        times["on"].append(time.perf_counter() - t)
        t = time.perf_counter()
        run(compose_config("train", base + ["task.feature_cache_dir=null", f"task.regions=[{','.join(regions)}]"],
                           output_dir=tmp / "out" / f"together{i}"))
        times["together"].append(time.perf_counter() - t)
    if repeat > 1:
        print("  times (s) per repeat: " + "; ".join(f"{k} {', '.join(f'{x:.1f}' for x in v)}" for k, v in times.items()))
    off, on, together = (min(times[k]) for k in ("off", "on", "together"))
    print(f"feature cache: {len(regions)} separate runs {off:.1f} s without, {on:.1f} s with: {off / on:.2f}x")
    print(f"{len(regions)} regions in one run (task.regions) vs {len(regions)} separate runs: {together:.1f} s vs "
          f"{on:.1f} s with the feature cache ({on / together:.2f}x), {off:.1f} s without ({off / together:.2f}x)")
    return {"pipeline": {"regions": "+".join(regions), "separate_s": off, "separate_cached_s": on,
                         "together_s": together, "ratio_cached": on / together, "ratio": off / together,
                         "repeat": repeat}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--voxels", type=int, default=1000, help="voxels per region (ridge part)")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=1, help="pipeline rounds, interleaved; the fastest of each counts")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--skip-pipeline", action="store_true", help="only the ridge part")
    ap.add_argument("--write-numbers", action="store_true",
                    help="write docs/numbers/encoding_regions.json (the Benchmarks page)")
    a = ap.parse_args()
    logging.getLogger("neuroguide").setLevel(logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch threads {torch.get_num_threads()}")
    values = ridge_regions(a.images, a.features, a.voxels)
    if not a.skip_pipeline:
        with tempfile.TemporaryDirectory() as tmp:
            values.update(pipeline(Path(tmp), repeat=a.repeat))
    if a.write_numbers:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "numbers"))
        from _common import write_numbers

        write_numbers("encoding_regions", {**values, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
