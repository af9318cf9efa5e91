"""The smoke command's cost, over seeds: writes ``docs/numbers/smoke_command.json``.

    python benchmarks/numbers/smoke_command.py [--seeds 0 1 2]

``python train.py region=TO alpha=0.5 task.max_epochs=1 'predictor.train_overrides=["task.max_epochs=1"]' seed=S``
for each seed as on a fresh machine (``_common.fresh_train_runs``); wall and CPU minutes (and every metric) as mean,
sd, min, max over the seeds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_seeds, fresh_train_runs, seeds_arg, summarize_runs, write_numbers  # noqa: E402

COMMAND = ["region=TO", "alpha=0.5", "task.max_epochs=1", 'predictor.train_overrides=["task.max_epochs=1"]']


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    seeds_arg(ap)
    args = ap.parse_args()
    check_seeds(ap, args.seeds)
    values = summarize_runs(fresh_train_runs(COMMAND, args.seeds), time_digits=2)
    values.update(seeds=args.seeds)
    write_numbers("smoke_command", values,
                  command="python benchmarks/numbers/smoke_command.py --seeds " + " ".join(map(str, args.seeds)))


if __name__ == "__main__":
    main()
