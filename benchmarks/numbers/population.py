"""Population and behavioural measures of guided classifiers at 32 px, over seeds: writes
``docs/numbers/population.json`` (the table of docs/evaluation/population.md).

    python benchmarks/numbers/population.py [--seeds 0 1 2]

For each seed, in its own temporary ``paths.root_dir``: the 32 px guided run of ``TRAIN`` (4 epochs, its predictor
4 epochs), then ``python evaluate.py ckpt=<its model.ckpt> eval=[population]`` with ``EVAL``. Table ``measures``: per
L2 eps the population sensitivity, the mean and max unit sensitivity, the population change under unit-targeted
perturbations and the decoder's accuracy clean / unit-targeted / decoder-targeted, mean +- sd over the seeds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_seeds, seeds_arg, summary, train_then_evaluate, write_numbers  # noqa: E402

TRAIN = ["region=TO", "alpha=0.5", "task.max_epochs=4", "data.image_size=32", "data.synthetic_imagenet.image_size=32",
         "data.synthetic_nsd.image_size=32", 'predictor.train_overrides=["task.max_epochs=4"]']
N_IMAGES = 16
EPS = ["0.25", "0.5", "1.0"]
EVAL = ["eval=[population]", "eval.population.layer=region", f"eval.population.eps_list=[{','.join(EPS)}]",
        "eval.population.steps=32", "eval.population.n_units=8", f"eval.population.n_images={N_IMAGES}"]
COLUMNS = [("population sensitivity", "population_sensitivity"), ("mean unit sensitivity", "mean_unit_sensitivity"),
           ("max unit sensitivity", "max_unit_sensitivity"),
           ("population change, unit-targeted", "population_change_unit_attack"),
           ("decoder acc clean", "decoder_acc_clean"), ("decoder acc unit-targeted", "decoder_acc_unit_attack"),
           ("decoder acc decoder-targeted", "decoder_acc_decoder_attack")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    seeds_arg(ap)
    args = ap.parse_args()
    check_seeds(ap, args.seeds)
    trained, evals = train_then_evaluate("population", TRAIN, EVAL, args.seeds)
    acc = [m["test/acc"] for m in trained]
    rows = [[f"L2 {e}", *(summary([ev[f"eval/population/l2_{e}/{k}"] for ev in evals]) for _, k in COLUMNS)]
            for e in EPS]
    write_numbers("population", {
        "measures": {"columns": ["eps", *(c for c, _ in COLUMNS)], "rows": rows},
        "n_units": summary([ev["eval/population/n_units"] for ev in evals], 0), "n_images": N_IMAGES,
        "test_acc": summary(acc), "seeds": args.seeds},
        command="python benchmarks/numbers/population.py --seeds " + " ".join(map(str, args.seeds)))


if __name__ == "__main__":
    main()
