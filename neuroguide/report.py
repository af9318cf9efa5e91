"""Compare runs without W&B: ``python -m neuroguide.report <sweep or outputs dir>``.

Every folder below the given one that holds a ``metrics.json`` and the ``config.yaml`` of a training run
(one with a ``task``) is a run (with the evaluation numbers of its ``eval_metrics.json`` when
``evaluate.py sweep_dir=...`` wrote one); its config gives the factors (task, region, alpha, at.eps,
shuffle, seed, subject; an encoding model's backbone). Folders written by ``evaluate.py`` are not runs. Writes ``report.csv`` and
``report.md`` (one row per run) and figures comparing regions, alphas and eps for the chosen metrics.
Regions are ordered as their configs say (``conf/region/*.yaml``: baselines first, then by ``order``).

A run folder that cannot be reported (a ``metrics.json`` or ``config.yaml`` cut short; a run that did not
finish or is still running: a train.py folder without ``metrics.json``) is left out of the table, named with
the reason in the log and at the end of ``report.md``, and counted; the other runs are reported.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import math
from pathlib import Path

import yaml

from neuroguide.utils.io import atomic_path, read_json
from neuroguide.utils.run_lock import lock_holder

log = logging.getLogger("neuroguide")

FACTORS = ["task", "region", "alpha", "at_eps", "shuffle", "seed", "subject", "backbone"]


class NotASweep(FileNotFoundError):
    """The folder holds no training run (``metrics.json`` beside a training ``config.yaml``) below it."""


def region_order(conf_dir: str | None = None) -> tuple[str, ...]:
    """Region names in report order, from the region configs ``<conf_dir>/region/*.yaml`` (default: the
    project's ``conf/``): baselines (``baseline`` set) first, then by each config's ``order`` (its place
    along the visual hierarchy), ties by name."""
    from neuroguide.config import CONF_DIR

    folder = Path(conf_dir or CONF_DIR) / "region"
    keys = []
    for f in sorted(folder.glob("*.yaml")):
        spec = yaml.safe_load(f.read_text()) or {}
        order = spec.get("order")
        if not isinstance(order, (int, float)) or isinstance(order, bool):
            raise ValueError(f"{f}: expected a number `order` (the region's place along the visual hierarchy, used "
                             f"to sort reports), found {order!r}; add e.g. `order: 3` to the file")
        keys.append((spec.get("baseline") is None, order, str(spec.get("name", f.stem))))
    return tuple(name for *_, name in sorted(keys))


@functools.lru_cache(maxsize=1)
def _project_region_order() -> tuple[str, ...]:
    """:func:`region_order` of the project's configs, read once (rows are sorted by it many times)."""
    return region_order()


def factors_of(config: dict) -> dict:
    """The sweep factors of one run from its resolved config: task, shuffle, seed and subject always; the others
    (region, alpha, at_eps, backbone) where the task's ``ModelKind.report_factors`` names them (alpha and at.eps
    mean something for the guided classifier only), else None."""
    g = lambda *ks: _get(config, ks)  # noqa: E731
    task = g("task", "name")
    try:
        from neuroguide.tasks import model_kind

        named = set(model_kind(task).report_factors)
    except KeyError:  # a run of a task this version does not know: report what its config holds
        named = {"region", "alpha", "at_eps", "backbone"}
    values = {"region": g("region", "name"), "alpha": g("alpha"), "at_eps": g("at", "eps"),
              "backbone": _backbone(config)}
    return {"task": task, **{k: (v if k in named else None) for k, v in values.items()},
            "shuffle": g("predictor", "shuffle"), "seed": g("seed"), "subject": g("subject")}


def _backbone(config: dict) -> str | None:
    """An encoding model's backbone: its name, with the L2 eps of a robust one (``resnet50 L2 3``) or ``random``."""
    b = config.get("backbone") or {}
    if not b.get("name"):
        return None
    if b.get("weights") == "random":
        return f"{b['name']} random"
    return f"{b['name']} L2 {b['at_eps']:g}" if b.get("at_eps") is not None and b.get("weights") is None else str(b["name"])


def _get(d, keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _nested(run: Path, root: Path) -> bool:
    """A predictor trained on the way by a guidance run (``predictor_*`` folder): not a run of the sweep."""
    return any(part.startswith("predictor_") for part in run.relative_to(root).parts)


def unfinished_runs(root: str | Path, marker: str = "metrics.json") -> dict[Path, str]:
    """The train.py run folders below ``root`` (a ``config.yaml`` or ``.hydra/config.yaml`` with a ``task``)
    that hold no ``marker`` file, each with why: still running (the process holding its run lock) or did not
    finish. ``marker``: ``metrics.json`` (written last by train.py) or ``model.ckpt``."""
    root = Path(root)
    found = {}
    for cfg_file in sorted(root.rglob("config.yaml")):
        run = cfg_file.parent.parent if cfg_file.parent.name == ".hydra" else cfg_file.parent
        if run in found or (run / marker).exists() or _nested(run, root) or "wandb" in run.relative_to(root).parts:
            continue  # wandb/*/files/config.yaml: W&B's copy of a run's config
        try:
            if "task" not in (yaml.safe_load(cfg_file.read_text()) or {}):
                continue
        except (OSError, yaml.YAMLError):
            pass  # a cut-short config of a folder without results: still a folder that did not finish
        holder = lock_holder(run)
        found[run] = (f"still running (pid {holder.get('pid')} on {holder.get('host')}, started "
                      f"{holder.get('started')})" if holder is not None else
                      f"the run did not finish (crashed or killed: see {run / 'train.log'})")
    return found


def collect(root: str | Path, skipped: list[tuple[str, str]] | None = None) -> list[dict]:
    """One dict per training run below ``root``: the factors, ``run`` (its folder) and its flat metrics.

    A run is a folder with ``metrics.json`` and the ``config.yaml`` of train.py (it has a ``task``);
    predictors trained on the way (``predictor_*`` folders) and evaluate.py's output folders are not runs.
    A run whose files cannot be read, and a run folder without ``metrics.json`` (:func:`unfinished_runs`),
    is left out and appended to ``skipped`` as ``(run, why)``. Raises :class:`NotASweep` (a
    FileNotFoundError) naming what was found when there is no run.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give the sweep folder (e.g. outputs/multirun/<name>)")
    rows, evaluations, no_config, bad = [], [], [], []
    for mfile in sorted(root.rglob("metrics.json")):
        run = mfile.parent
        if _nested(run, root):
            continue
        cfg_file = run / "config.yaml"
        if not cfg_file.exists():
            no_config.append(run)
            continue
        try:
            config = yaml.safe_load(cfg_file.read_text()) or {}
            if "task" not in config:
                evaluations.append((run, config))  # evaluate.py's output: figures and metrics of runs, not a run
                continue
            row = {"run": str(run.relative_to(root)) or ".", **factors_of(config)}
            row.update(read_json(mfile))
            if (run / "eval_metrics.json").exists():  # written by evaluate.py sweep_dir=...
                row.update(read_json(run / "eval_metrics.json"))
        except (json.JSONDecodeError, yaml.YAMLError, OSError) as e:  # read_json names the file
            why = str(e) if isinstance(e, json.JSONDecodeError) else f"{cfg_file}: {type(e).__name__}: {e}"
            bad.append((str(run.relative_to(root)) or ".", f"{why}; skipped"))
            continue
        rows.append(row)
    bad += [(str(run.relative_to(root)) or ".", f"no metrics.json: {why}") for run, why in unfinished_runs(root).items()]
    if skipped is not None:
        skipped.extend(bad)
    if not rows:
        raise NotASweep(_not_a_sweep(root, evaluations, no_config, bad))
    return rows


def _not_a_sweep(root: Path, evaluations: list[tuple[Path, dict]], no_config: list[Path],
                 bad: list[tuple[str, str]] = ()) -> str:
    msg = (f"{root} is not a sweep or run folder: no metrics.json below it has the config.yaml of a train.py run "
           "(with a `task`) beside it.")
    if bad:
        msg += f" {len(bad)} run folder(s) could not be reported: " + "; ".join(f"{r}: {w}" for r, w in bad[:5]) + "."
    if evaluations:
        names = ", ".join(str(r) for r, _ in evaluations[:3]) + (" ..." if len(evaluations) > 3 else "")
        msg += f" Found {len(evaluations)} evaluate.py output folder(s) ({names}), which are not runs."
        swept = [str(c["sweep_dir"]) for _, c in evaluations if c.get("sweep_dir")]
        if swept:
            msg += f" Report the sweep they evaluated: python -m neuroguide.report {swept[0]}"
    if no_config:
        msg += (f" {len(no_config)} folder(s) hold metrics.json without config.yaml (e.g. {no_config[0]}): "
                "train.py writes both; copy the run's config.yaml beside its metrics.json.")
    return msg + " Give the sweep folder of train.py (e.g. outputs/multirun/<name>)."


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def write_tables(rows: list[dict], out_dir: Path, metrics: list[str] | None = None,
                 skipped: list[tuple[str, str]] = ()) -> tuple[Path, Path]:
    """``report.csv`` and ``report.md`` (one row per run; ``report.md`` then lists the ``skipped`` run folders)."""
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
    if skipped:
        lines += ["", f"**{len(skipped)} run folder(s) not in the table:**", ""]
        lines += [f"- `{run}`: {why}" for run, why in skipped]
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return out_dir / "report.csv", out_dir / "report.md"


def _sort_key(v):
    order = _project_region_order()
    if isinstance(v, str) and v in order:
        return (0, order.index(v), "")
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
    """Tables and figures for all runs below ``root``; returns the written paths, the number of runs and the
    ``skipped`` run folders ``(run, why)`` (warned about, listed in report.md)."""
    skipped: list[tuple[str, str]] = []
    rows = collect(root, skipped)
    for run, why in skipped:
        log.warning("report: left out %s: %s", run, why)
    if skipped:
        log.warning("report: %d run(s) reported, %d run folder(s) left out (listed in report.md)", len(rows),
                    len(skipped))
    out = Path(out_dir or root)
    csv_path, md_path = write_tables(rows, out, metrics, skipped)
    figs = []
    present = {k for r in rows for k in r}
    wanted = metrics or [m for m in DEFAULT_FIGURE_METRICS if m in present] + sorted(
        k for k in present if k.startswith("eval/") and k.endswith("/acc"))[:6]
    for m in wanted:
        p = plot_by_region(rows, m, out / "figures" / (m.replace("/", "_") + ".png"))
        if p:
            figs.append(p)
    return {"csv": csv_path, "markdown": md_path, "figures": figs, "runs": len(rows), "skipped": skipped}


def robustness_by_region(sweep_dir: str | Path, out: str | Path) -> Path | None:
    """Robust accuracy against eps, one line per run labelled by region (and alpha, at.eps), as in
    Shao et al.; read from each run's ``eval/robustness/robustness.csv`` (written by
    ``evaluate.py sweep_dir=... eval=[robustness]``). Writes ``<out>/robust_accuracy_by_region.png``;
    None when no run has that table."""
    from neuroguide.evaluation.plots import curve_figure

    sweep_dir = Path(sweep_dir)
    rows = sorted(collect(sweep_dir), key=lambda r: tuple(_sort_key(r.get(k)) for k in FACTORS))
    panels = []
    for norm, unit in (("l2", "L2 eps"), ("linf", "Linf eps (x 255)")):
        curves = []
        for r in rows:
            table = sweep_dir / r["run"] / "eval" / "robustness" / "robustness.csv"
            if not table.exists():
                continue
            with open(table, newline="") as f:
                recs = list(csv.DictReader(f))
            clean = [float(x["acc"]) for x in recs if x["attack"] == "clean"]
            pgd = sorted((float(x["eps"]), float(x["acc"])) for x in recs if x["attack"] == "pgd" and x["norm"] == norm)
            if pgd:
                scale = 255.0 if norm == "linf" else 1.0
                curves.append({"x": [0.0] + [e * scale for e, _ in pgd], "y": clean[:1] + [a for _, a in pgd],
                               "label": f"{r.get('region')} (alpha {r.get('alpha')}, at.eps {r.get('at_eps')})"})
        if curves:
            panels.append({"title": f"PGD {norm.upper()}", "xlabel": unit, "ylabel": "accuracy", "curves": curves})
    if not panels:
        return None
    return curve_figure(panels, Path(out) / "robust_accuracy_by_region.png", title="robust accuracy by guiding region")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m neuroguide.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="sweep folder (outputs/multirun/<name>) or any folder of runs")
    ap.add_argument("--out", default=None, help="where to write report.csv/.md and figures/ (default: root)")
    ap.add_argument("--metrics", nargs="*", default=None, help="metric keys for the table columns and figures")
    args = ap.parse_args(argv)
    try:
        res = report(args.root, args.out, args.metrics)
    except FileNotFoundError as e:  # not a folder, or no run in it: say so, exit non-zero
        ap.exit(2, f"python -m neuroguide.report: error: {e}\n")
    print(Path(res["markdown"]).read_text())
    left_out = f", {len(res['skipped'])} run folder(s) left out (listed above)" if res["skipped"] else ""
    print(f"{res['runs']} runs -> {res['csv']}, {res['markdown']}, {len(res['figures'])} figures{left_out}")


if __name__ == "__main__":
    main()
