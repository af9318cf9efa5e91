"""Region control of the synthetic default's TO predictor, over seeds: writes ``docs/numbers/control.json``.

    python benchmarks/numbers/control.py [--seeds 0 1 2]

For each seed, in its own temporary ``paths.root_dir``: ``python train.py task=predictor region=TO seed=S`` (12
epochs), then ``python evaluate.py ckpt=<its model.ckpt> eval=[control]`` with the defaults of
``conf/eval/control.yaml`` (the region response named explicitly, ``eval.control.layer=region``). Table
``change_sd``: per eps the achieved change of the region's mean response up and down, in sd units over the natural
held-out images, mean +- sd over the seeds; ``test_r_median`` of the predictors.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_seeds, eps_label, seeds_arg, summary, train_then_evaluate, write_numbers  # noqa: E402

KEY = re.compile(r"^eval/control/((?:l2_[0-9.]+)|(?:linf_[0-9]+_255))/(up|down)/change_sd$")


def eps_order(tag: str) -> tuple:
    norm, rest = tag.split("_", 1)
    return (norm != "l2", float(rest.split("_")[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    seeds_arg(ap)
    args = ap.parse_args()
    check_seeds(ap, args.seeds)
    trained, evals = train_then_evaluate("control", ["task=predictor", "region=TO"],
                                         ["eval=[control]", "eval.control.layer=region"], args.seeds)
    r_median = [m["test/r_median"] for m in trained]
    tags = sorted({KEY.match(k).group(1) for k in evals[0] if KEY.match(k)}, key=eps_order)
    rows = [[eps_label(t), *(summary([e[f"eval/control/{t}/{d}/change_sd"] for e in evals]) for d in ("up", "down"))]
            for t in tags]
    write_numbers("control", {
        "change_sd": {"columns": ["eps", "up (change / sd)", "down (change / sd)"], "rows": rows},
        "test_r_median": summary(r_median), "seeds": args.seeds},
        command="python benchmarks/numbers/control.py --seeds " + " ".join(map(str, args.seeds)))


if __name__ == "__main__":
    main()
