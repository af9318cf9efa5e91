"""The main command's cost and result, over seeds: writes ``docs/numbers/main_command.json``.

    python benchmarks/numbers/main_command.py [--seeds 0 1 2]

Runs ``python train.py region=TO alpha=0.5 seed=S`` for each seed as on a fresh machine
(``_common.fresh_train_runs``: its own temporary ``paths.root_dir``, so the synthetic data are written, the TO
predictor is trained on the way and the run folder is new), one run at a time. Records per run the wall time, the CPU
time (user + system of train.py and its workers), the load average (the machine's other work, which the wall time
depends on), the run folder's size, ``model.ckpt``'s size and every number in the run's ``metrics.json``, and writes
each as mean, sd, min, max over the seeds (``test/acc`` -> key ``test_acc``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_seeds, fresh_train_runs, seeds_arg, summarize_runs, write_numbers  # noqa: E402

COMMAND = ["region=TO", "alpha=0.5"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    seeds_arg(ap)
    ap.add_argument("--keep", action="store_true", help="keep the temporary run folders")
    args = ap.parse_args()
    check_seeds(ap, args.seeds)
    values = summarize_runs(fresh_train_runs(COMMAND, args.seeds, args.keep))
    values.update(seeds=args.seeds, train_command="python train.py " + " ".join(COMMAND))
    write_numbers("main_command", values,
                  command="python benchmarks/numbers/main_command.py --seeds " + " ".join(map(str, args.seeds)))


if __name__ == "__main__":
    main()
