"""All seven Kastner regions in one pass over the session files, against one pass per region.

One pass per region is how earlier NSD code extracted regions (each region re-reads every session
file). Both sides run in this process on the same synthetic NSD files (real layout, a larger
volume than the test default); the script prints the time ratio and each side's peak memory
(tracemalloc: numpy and Python allocations) and checks that both give the same arrays.

    python benchmarks/nsd_extract.py [--volume 48 56 44] [--format nii.gz|hdf5]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from neuroguide.data.nsd_regions import RegionSpec, extract_regions
from neuroguide.data.synthetic.nsd import write_synthetic_nsd

REGIONS = {"V1": (1, 2), "V2": (3, 4), "V4": (7,), "VO": (8, 9), "PHC": (10, 11), "TO": (12, 13), "LO": (14, 15)}


def measure(fn):
    tracemalloc.start()
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, dt, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volume", type=int, nargs=3, default=[48, 56, 44])
    ap.add_argument("--format", default="nii.gz", choices=["nii.gz", "hdf5"])
    ap.add_argument("--root", default=None, help="folder for the synthetic tree (default: a temp folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp) / "nsd_bench"
        print(f"writing synthetic NSD with volume {args.volume} ...", flush=True)
        write_synthetic_nsd(root, volume=tuple(args.volume), n_stimuli=900, n_subject_images=700, n_shared=100,
                            trials_per_session=300, image_size=16)
        specs = [RegionSpec(n, "Kastner2015", labels, "nsdgeneral") for n, labels in REGIONS.items()]
        kw = dict(betas_format=args.format, progress=False)  # no cache: both sides read the files
        one, t_one, m_one = measure(lambda: extract_regions(root, 1, specs, **kw))
        per, t_per, m_per = measure(lambda: {s.name: extract_regions(root, 1, [s], **kw)[s.name] for s in specs})
        for name in REGIONS:
            np.testing.assert_allclose(one[name].train, per[name].train, atol=1e-6)
        n_vox = sum(one[n].n_voxels for n in REGIONS)
        print(f"7 regions ({n_vox} voxels), {one['V1'].meta['sessions']} sessions x "
              f"{one['V1'].meta['trials'] // one['V1'].meta['sessions']} trials, format {args.format}")
        print(f"one pass for all regions : {t_one:7.2f} s, peak {m_one / 2**20:7.1f} MiB")
        print(f"one pass per region      : {t_per:7.2f} s, peak {m_per / 2**20:7.1f} MiB")
        print(f"speed-up (per-region / one-pass): {t_per / t_one:.2f}x")


if __name__ == "__main__":
    main()
