"""Guo et al.'s closed loop on the simulated brain, over loop seeds: writes ``docs/numbers/closed_loop.json``
(docs/closed-loop.md).

    python benchmarks/numbers/closed_loop.py [--seeds 0 1 2]

For each ``loop.seed`` (the brain fixed, ``loop.brain.seed=0``), each in its own temporary folder:

- the default, ``python closed_loop.py step=simulate days=4 threads=1 loop.seed=S``: table ``simulation`` (per eps
  the lower bound of days 0-3, day 3's Gaussian and interpolation controls (normalized RMS, noise-corrected) and the
  brain's white-box sensitivity) and its wall and CPU minutes;
- ``loop.model.weight_noise`` 0, 0.1, 0.25, 0.5 and an unrelated random network (``loop.model.weights=null``):
  table ``weight_noise``, the lower bound at eps 0.5 on days 1, 2, 3;
- ``loop.refit.backbone_lr`` 0, 1e-5, 1e-4 with the brain's own trunk (``loop.model.weight_noise=0``): table
  ``backbone_lr``, the lower bound at eps 0.5 on days 1, 2, 3.

All cells are mean +- sd over the seeds. About 9 simulations per seed, a few minutes each on one CPU thread.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_seeds, run_entry, seeds_arg, summary, write_numbers  # noqa: E402

BASE = ["step=simulate", "days=4", "threads=1"]
EPS = ["0.25", "0.5", "1.0"]
WEIGHT_NOISE = {"0 (the brain's own trunk)": ["loop.model.weight_noise=0"],
                "0.1 (the default)": ["loop.model.weight_noise=0.1"],
                "0.25": ["loop.model.weight_noise=0.25"], "0.5": ["loop.model.weight_noise=0.5"],
                "an unrelated random network": ["loop.model.weights=null"]}
BACKBONE_LR = {"0 (the default: readout only)": ["loop.model.weight_noise=0", "loop.refit.backbone_lr=0"],
               "1e-5": ["loop.model.weight_noise=0", "loop.refit.backbone_lr=1e-5"],
               "1e-4": ["loop.model.weight_noise=0", "loop.refit.backbone_lr=1e-4"]}


def key(day: int, eps: str, name: str) -> str:
    return f"closed_loop/day_{day}/l2_{eps}/{name}"


def sweep_rows(label_col: str, variants: dict, results: dict) -> dict:
    rows = [[label, *(summary([m[key(d, "0.5", "lower_bound_norm")] for m in results[label]], 2) for d in (1, 2, 3))]
            for label in variants]
    return {"columns": [label_col, "day 1", "day 2", "day 3"], "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    seeds_arg(ap)
    args = ap.parse_args()
    check_seeds(ap, args.seeds)
    root = Path(tempfile.mkdtemp(prefix="ng-numbers-loop-"))
    default, times, sweeps = [], [], {}
    for s in args.seeds:
        m = run_entry("closed_loop.py", [*BASE, f"loop.seed={s}"], root, root / f"default_seed{s}")
        times.append(m.pop("_time"))
        default.append(m)
        for name, variants in (("weight_noise", WEIGHT_NOISE), ("backbone_lr", BACKBONE_LR)):
            for i, (label, ov) in enumerate(variants.items()):
                sweeps.setdefault(name, {}).setdefault(label, []).append(
                    run_entry("closed_loop.py", [*BASE, f"loop.seed={s}", *ov], root, root / f"{name}{i}_seed{s}"))
    shutil.rmtree(root, ignore_errors=True)
    cell = lambda d, e, n: summary([m[key(d, e, n)] for m in default], 2)  # noqa: E731
    rows = [[f"day {d} lower bound" + (" (random readout)" if d == 0 else ""), *(cell(d, e, "lower_bound_norm")
                                                                               for e in EPS)] for d in range(4)]
    rows += [["day 3 Gaussian noise (RMS, noise-corrected)", *(cell(3, e, "gaussian_rms_norm") for e in EPS)],
             ["day 3 Gaussian noise (RMS, raw)", *(cell(3, e, "gaussian_rms_raw_norm") for e in EPS)],
             ["day 3 interpolation (RMS, noise-corrected)", *(cell(3, e, "interpolation_rms_norm") for e in EPS)],
             ["day 3 interpolation (RMS, raw)", *(cell(3, e, "interpolation_rms_raw_norm") for e in EPS)],
             ["the brain's white-box sensitivity (truth)", *(cell(3, e, "truth_norm") for e in EPS)]]
    write_numbers("closed_loop", {
        "simulation": {"columns": ["normalized sensitivity", *(f"eps {e}" for e in EPS)], "rows": rows},
        "weight_noise": sweep_rows("`loop.model.weight_noise`", WEIGHT_NOISE, sweeps["weight_noise"]),
        "backbone_lr": sweep_rows("`loop.refit.backbone_lr`", BACKBONE_LR, sweeps["backbone_lr"]),
        "wall_min": summary([t["wall_s"] / 60 for t in times], 1), "cpu_min": summary([t["cpu_s"] / 60 for t in times], 1),
        "seeds": args.seeds},
        command="python benchmarks/numbers/closed_loop.py --seeds " + " ".join(map(str, args.seeds)))


if __name__ == "__main__":
    main()
