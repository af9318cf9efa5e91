"""The guided classifier against the unguided baseline on the synthetic default, over seeds: writes
``docs/numbers/guidance_baselines.json`` (the learning-rate table of docs/tasks/guidance.md).

    python benchmarks/numbers/guidance_baselines.py [--seeds 0 1 2]

In one temporary ``paths.root_dir``: the TO predictor trained once (``python train.py task=predictor region=TO``,
seed 0), then for each seed ``python train.py region=none seed=S`` and ``python train.py region=TO alpha=0.5 seed=S``.
Table ``recipe``: per command val/acc, test/acc and val/neural_r as mean +- sd over the seeds.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_seeds, run_entry, seeds_arg, summary, write_numbers  # noqa: E402

COMMANDS = {"python train.py region=none": ["region=none"],
            "python train.py region=TO alpha=0.5": ["region=TO", "alpha=0.5"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    seeds_arg(ap)
    args = ap.parse_args()
    check_seeds(ap, args.seeds)
    root = Path(tempfile.mkdtemp(prefix="ng-numbers-baselines-"))
    run_entry("train.py", ["task=predictor", "region=TO", "seed=0"], root, root / "predictor")
    rows = []
    for label, ov in COMMANDS.items():
        ms = [run_entry("train.py", [*ov, f"seed={s}"], root, root / f"{ov[0]}_seed{s}") for s in args.seeds]
        neural = [m["val/neural_r"] for m in ms if "val/neural_r" in m]
        rows.append([f"`{label}`", summary([m["val/acc"] for m in ms]), summary([m["test/acc"] for m in ms]),
                     summary(neural) if len(neural) == len(ms) else "-"])
    shutil.rmtree(root, ignore_errors=True)
    write_numbers("guidance_baselines", {
        "recipe": {"columns": ["command", "val/acc", "test/acc", "val/neural_r"], "rows": rows}, "seeds": args.seeds},
        command="python benchmarks/numbers/guidance_baselines.py --seeds " + " ".join(map(str, args.seeds)))


if __name__ == "__main__":
    main()
