"""The per-layer table of an encoding model on the planted-depth synthetic NSD, over seeds: writes
``docs/numbers/encoding_planted.json`` (docs/tasks/encoding.md).

    python benchmarks/numbers/encoding_planted.py [--seeds 0 1 2]

In one temporary ``paths.root_dir`` (the features are cached once and shared): for each seed
``python train.py task=encoding backbone=planted data.synthetic_nsd.planted=depth region=FFA seed=S``; from each
run's ``layers.csv`` per layer the feature count, the validation median r (which chooses the layer) and the test
median r / sqrt(NC), as mean +- sd over the seeds, and the layer each run chose.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_seeds, run_entry, seeds_arg, summary, write_numbers  # noqa: E402

COMMAND = ["task=encoding", "backbone=planted", "data.synthetic_nsd.planted=depth", "region=FFA"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    seeds_arg(ap)
    args = ap.parse_args()
    check_seeds(ap, args.seeds)
    root = Path(tempfile.mkdtemp(prefix="ng-numbers-encoding-"))
    tables = []
    for s in args.seeds:
        out = root / f"seed{s}"
        run_entry("train.py", [*COMMAND, f"seed={s}"], root, out)
        with open(out / "layers.csv") as f:
            tables.append(list(csv.DictReader(f)))
    shutil.rmtree(root, ignore_errors=True)
    layers = [r["layer"] for r in tables[0]]
    rows = []
    for i, layer in enumerate(layers):
        runs = [t[i] for t in tables]
        rows.append([f"`{layer}`", int(runs[0]["n_features"]), summary([float(r["val_r_median"]) for r in runs]),
                     summary([float(r["test_r_nc_median"]) for r in runs]),
                     sum(r["selected"] == "True" for r in runs)])
    chosen = [next(r["layer"] for r in t if r["selected"] == "True") for t in tables]
    write_numbers("encoding_planted", {
        "layers": {"columns": ["FFA layer", "features", "val median r", "test median r / sqrt(NC)",
                               f"chosen (of {len(tables)} runs)"], "rows": rows},
        "chosen": chosen, "seeds": args.seeds},
        command="python benchmarks/numbers/encoding_planted.py --seeds " + " ".join(map(str, args.seeds)))


if __name__ == "__main__":
    main()
