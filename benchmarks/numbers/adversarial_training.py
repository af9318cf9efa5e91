"""Adversarial training against plain training on the synthetic default, over seeds: writes
``docs/numbers/adversarial_training.json`` (the tables of docs/tasks/guidance.md).

    python benchmarks/numbers/adversarial_training.py [--seeds 0 1 2]

In one temporary ``paths.root_dir``: the TO predictor trained once (seed 0); for each seed the six runs

- 12 epochs (the default): plain, ``at.eps=1.0 at.norm=l2``, ``at.eps=2.0 at.norm=l2``;
- 24 epochs: plain ``task.max_epochs=24``, and ``at.eps=1.0`` / ``at.eps=2.0`` with ``task.max_epochs=24
  task.monitor=val/adv_acc``;

each evaluated by ``python evaluate.py ckpt=<model.ckpt> eval=[robustness]`` on all test images (PGD 10 steps, L2 eps
1, 2, 4 and Linf 8/255, 16/255, no FGSM, no AutoAttack); and the 24-epoch AT runs paired with the plain one on the
same images (``benchmarks/adversarial_training.py``'s ``paired``: right only under AT / only plain, exact McNemar).
Tables ``epochs12``, ``epochs24`` (accuracy, mean +- sd over seeds) and ``paired`` (one row per seed, model, eps).
Hours of CPU: about 18 training runs.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import check_seeds, run_entry, seeds_arg, summary, write_numbers  # noqa: E402

BASE = ["region=TO", "alpha=0.5"]
AT24 = ["task.max_epochs=24", "task.monitor=val/adv_acc"]
RUNS = {
    "epochs12": {"(plain)": [], "`at.eps=1.0 at.norm=l2`": ["at.eps=1.0", "at.norm=l2"],
                 "`at.eps=2.0 at.norm=l2`": ["at.eps=2.0", "at.norm=l2"]},
    "epochs24": {"(plain)": ["task.max_epochs=24"], "`at.eps=1.0 task.monitor=val/adv_acc`": ["at.eps=1.0", *AT24],
                 "`at.eps=2.0 task.monitor=val/adv_acc`": ["at.eps=2.0", *AT24]},
}
EVAL = ["eval=[robustness]", "eval.robustness.n_images=null", "eval.robustness.eps_l2=[1.0,2.0,4.0]",
        "eval.robustness.eps_linf=[8/255,16/255]", "eval.robustness.fgsm=false", "eval.robustness.autoattack=false"]
COLUMNS = [("clean", "clean"), ("L2 1.0", "l2_1.0"), ("L2 2.0", "l2_2.0"), ("L2 4.0", "l2_4.0"),
           ("Linf 8/255", "linf_8_255"), ("Linf 16/255", "linf_16_255")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    seeds_arg(ap)
    args = ap.parse_args()
    check_seeds(ap, args.seeds)
    import importlib.util

    spec = importlib.util.spec_from_file_location("at_benchmark", HERE.parent / "adversarial_training.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    paired = bench.paired  # benchmarks/adversarial_training.py: the same PGD on every model, exact McNemar

    root = Path(tempfile.mkdtemp(prefix="ng-numbers-at-"))
    run_entry("train.py", ["task=predictor", "region=TO", "seed=0"], root, root / "predictor")
    values, paired_rows = {"seeds": args.seeds}, []
    for table, runs in RUNS.items():
        rows = []
        for i, (label, ov) in enumerate(runs.items()):
            accs = []
            for s in args.seeds:
                run = root / f"{table}_{i}_seed{s}"
                run_entry("train.py", [*BASE, *ov, f"seed={s}"], root, run)
                m = run_entry("evaluate.py", [f"ckpt={run / 'model.ckpt'}", *EVAL], root, root / f"eval_{run.name}")
                accs.append([m[f"eval/robustness/{k}/acc"] for _, k in COLUMNS])
            rows.append([label, *(summary([a[j] for a in accs]) for j in range(len(COLUMNS)))])
        values[table] = {"columns": [f"`python train.py {' '.join(BASE)}" + (" task.max_epochs=24" if table == "epochs24"
                                     else "") + " ...`", *(c for c, _ in COLUMNS)], "rows": rows}
    for s in args.seeds:
        plain, ats = root / f"epochs24_0_seed{s}" / "model.ckpt", [root / f"epochs24_{i}_seed{s}" / "model.ckpt"
                                                                   for i in (1, 2)]
        for r in paired(str(plain), [str(p) for p in ats], [1.0, 2.0]):
            eps_at = "1.0" if r["model"].startswith("epochs24_1") else "2.0"
            paired_rows.append([s, f"`at.eps={eps_at}`", r["eps"], round(r["acc"], 3), round(r["plain_acc"], 3),
                                r["only_at"], r["only_plain"], float(f"{r['p']:.2g}")])
    values["paired"] = {"columns": ["seed", "AT run (24 epochs)", "L2 eps", "AT acc", "plain acc", "right only under AT",
                                    "right only plain", "exact McNemar p"], "rows": paired_rows}
    shutil.rmtree(root, ignore_errors=True)
    write_numbers("adversarial_training", values,
                  command="python benchmarks/numbers/adversarial_training.py --seeds " + " ".join(map(str, args.seeds)))


if __name__ == "__main__":
    main()
