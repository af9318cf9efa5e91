"""Compare runs without W&B: ``python -m neuroguide.report <sweep or outputs dir>``.

Every folder below the given one that holds a ``metrics.json`` is a run (with the evaluation numbers of
its ``eval_metrics.json`` when ``evaluate.py sweep_dir=...`` wrote one); its ``config.yaml`` gives the
factors (task, region, alpha, at.eps, shuffle, seed, subject). Writes ``report.csv`` and ``report.md``
(one row per run) and figures comparing regions, alphas and eps for the chosen metrics.
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import yaml

from neuroguide.utils.io import atomic_path, read_json

REGION_ORDER = ["none", "random", "V1", "V2", "V4", "VO", "PHC", "LO", "TO", "FFA", "EBA", "PPA"]
FACTORS = ["task", "region", "alpha", "at_eps", "shuffle", "seed", "subject"]


def factors_of(config: dict) -> dict:
    """The sweep factors of one run from its resolved config."""
    g = lambda *ks: _get(config, ks)  # noqa: E731
    task = g("task", "name")
    guided = task == "guidance"  # alpha and at.eps mean something for the guided classifier only
    return {"task": task, "region": g("region", "name"), "alpha": g("alpha") if guided else None,
            "at_eps": g("at", "eps") if guided else None, "shuffle": g("predictor", "shuffle"), "seed": g("seed"),
            "subject": g("subject")}


def _get(d, keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def collect(root: str | Path) -> list[dict]:
    """One dict per run below ``root``: the factors, ``run`` (its folder) and its flat metrics."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give the sweep folder (e.g. outputs/multirun/<name>)")
    rows = []
    for mfile in sorted(root.rglob("metrics.json")):
        run = mfile.parent
        if any(part.startswith("predictor_") for part in run.relative_to(root).parts):
            continue  # predictors trained on the way by a guidance run are not runs of this sweep
        cfg_file = run / "config.yaml"
        config = yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else {}
        row = {"run": str(run.relative_to(root)) or ".", **factors_of(config or {})}
        row.update(read_json(mfile))
        if (run / "eval_metrics.json").exists():  # written by evaluate.py sweep_dir=...
            row.update(read_json(run / "eval_metrics.json"))
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no metrics.json below {root}: is it a sweep or run folder of train.py/evaluate.py?")
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def write_tables(rows: list[dict], out_dir: Path, metrics: list[str] | None = None) -> tuple[Path, Path]:
    keys = FACTORS + ["run"]
    metric_keys = metrics or sorted({k for r in rows for k in r if "/" in k})
    cols = keys + metric_keys
    rows = sorted(rows, key=lambda r: tuple(_sort_key(r.get(k)) for k in FACTORS))
    with atomic_path(out_dir / "report.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k) for k in cols})
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |" for r in rows]
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return out_dir / "report.csv", out_dir / "report.md"


def _sort_key(v):
    if isinstance(v, str) and v in REGION_ORDER:
        return (0, REGION_ORDER.index(v), "")
    if isinstance(v, (int, float)):
        return (1, float(v), "")
    return (2, 0, str(v))


def plot_by_region(rows: list[dict], metric: str, out: Path, line_factor: str = "auto") -> Path | None:
    """``metric`` against region, one line per value of the other varying factor (alpha, at_eps, shuffle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if isinstance(r.get(metric), (int, float))]
    if not rows:
        return None
    if line_factor == "auto":
        varying = [f for f in ("alpha", "at_eps", "shuffle", "task") if len({str(r.get(f)) for r in rows}) > 1]
        line_factor = varying[0] if varying else None
    regions = sorted({r["region"] for r in rows}, key=_sort_key)
    groups = sorted({str(r.get(line_factor)) for r in rows}) if line_factor else ["all"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(regions), 3.5))
    for g in groups:
        ys, es = [], []
        for reg in regions:
            v = [r[metric] for r in rows if r["region"] == reg and (not line_factor or str(r.get(line_factor)) == g)]
            ys.append(np.mean(v) if v else np.nan)
            es.append(np.std(v) if len(v) > 1 else 0.0)
        ax.errorbar(range(len(regions)), ys, yerr=es, marker="o", capsize=3,
                    label=f"{line_factor}={g}" if line_factor else None)
    ax.set_xticks(range(len(regions)), regions)
    ax.set_xlabel("region")
    ax.set_ylabel(metric)
    if line_factor:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out


DEFAULT_FIGURE_METRICS = ["test/r_median", "val/acc", "val/neural_r", "test/acc"]


def report(root: str | Path, out_dir: str | Path | None = None, metrics: list[str] | None = None) -> dict:
    """Tables and figures for all runs below ``root``; returns the written paths."""
    rows = collect(root)
    out = Path(out_dir or root)
    csv_path, md_path = write_tables(rows, out, metrics)
    figs = []
    present = {k for r in rows for k in r}
    wanted = metrics or [m for m in DEFAULT_FIGURE_METRICS if m in present] + sorted(
        k for k in present if k.startswith("eval/") and k.endswith("/acc"))[:6]
    for m in wanted:
        p = plot_by_region(rows, m, out / "figures" / (m.replace("/", "_") + ".png"))
        if p:
            figs.append(p)
    return {"csv": csv_path, "markdown": md_path, "figures": figs, "runs": len(rows)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m neuroguide.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="sweep folder (outputs/multirun/<name>) or any folder of runs")
    ap.add_argument("--out", default=None, help="where to write report.csv/.md and figures/ (default: root)")
    ap.add_argument("--metrics", nargs="*", default=None, help="metric keys for the table columns and figures")
    args = ap.parse_args(argv)
    res = report(args.root, args.out, args.metrics)
    print(Path(res["markdown"]).read_text())
    print(f"{res['runs']} runs -> {res['csv']}, {res['markdown']}, {len(res['figures'])} figures")


if __name__ == "__main__":
    main()
