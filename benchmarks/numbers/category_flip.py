"""The category preference flip on guided models of the synthetic default, over seeds: writes
``docs/numbers/category_flip.json``.

    python benchmarks/numbers/category_flip.py [--seeds 0 1 2]

For each seed, in its own temporary ``paths.root_dir``: ``python train.py region=TO alpha=0.5 seed=S`` (the TO
predictor trained on the way), then ``python evaluate.py ckpt=<its model.ckpt> eval=[control]`` with the defaults
(the category flip on the neural head's mean response). Values, mean +- sd over the seeds: ``flip_eps``,
``flip_eps_median_image``, ``super_eps`` (where the perturbed images pass the best natural image) and
``relative_to_best_sd`` (at the largest eps), and the guided models' ``test_acc``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_seeds, seeds_arg, summary, train_then_evaluate, write_numbers  # noqa: E402

P = "eval/control/category_flip"
KEYS = {"flip_eps": f"{P}/flip_eps", "flip_eps_median_image": f"{P}/mean/flip_eps_median_image",
        "super_eps": f"{P}/mean/super_eps", "relative_to_best_sd": f"{P}/relative_to_best_sd"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    seeds_arg(ap)
    args = ap.parse_args()
    check_seeds(ap, args.seeds)
    trained, evals = train_then_evaluate("flip", ["region=TO", "alpha=0.5"],
                                         ["eval=[control]", "eval.control.layer=region"], args.seeds)
    acc = [m["test/acc"] for m in trained]
    values = {name: summary([e.get(key, float("nan")) for e in evals]) for name, key in KEYS.items()}
    values.update(test_acc=summary(acc), seeds=args.seeds)
    write_numbers("category_flip", values,
                  command="python benchmarks/numbers/category_flip.py --seeds " + " ".join(map(str, args.seeds)))


if __name__ == "__main__":
    main()
