"""Shared by the scripts in ``benchmarks/numbers/``: run a command, summarise repeated runs, write the data file.

Every measured number in the docs comes from one of these scripts: each writes ``docs/numbers/<name>.json``,

    {"command": "<how to reproduce this file>", "date": "<ISO 8601, UTC>", "machine": "<cpu, cores, os, torch>",
     "values": {...}}

and the docs hook (``docs/hooks/numbers.py``) renders ``{{ numbers.<name>.<key> }}`` from it. A number that varies
between machines or seeds (a time, an accuracy of one training run) is written as a summary over >= 3 repeats
(:func:`summary`: mean, sample standard deviation, min, max, n and the runs themselves), never one run's figure.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NUMBERS_DIR = REPO / "docs" / "numbers"


def machine() -> str:
    """One line naming the machine: CPU model, cores available to this process, OS, Python, torch, GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [f"{cpu}, {cores} cores", f"{platform.system()} {platform.release()}", f"Python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            parts.append(torch.cuda.get_device_name(0))
    except ImportError:
        pass
    return "; ".join(parts)


def summary(xs: list[float], digits: int = 3) -> dict:
    """``{"mean", "sd", "min", "max", "n", "runs"}`` of repeated measurements ``xs`` (sd: the sample standard
    deviation, n - 1 in the denominator; NaN for a single run, which is never written as the result)."""
    xs = [float(x) for x in xs]
    n = len(xs)
    mean = sum(xs) / n if n else math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    r = lambda v: round(v, digits) if math.isfinite(v) else None  # noqa: E731  (JSON has no NaN)
    return {"mean": r(mean), "sd": r(sd), "min": r(min(xs)) if xs else None, "max": r(max(xs)) if xs else None,
            "n": n, "runs": [r(x) for x in xs]}


def timed_run(argv: list[str], env: dict | None = None, cwd: Path = REPO, log: Path | None = None) -> dict:
    """Run ``argv`` to completion; returns wall seconds, CPU seconds (user + system of the child processes) and
    the load average before and after (the machine's other work, which the wall time depends on)."""
    load0 = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") if log else open(os.devnull, "w") as out:
        proc = subprocess.run(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed with exit status {proc.returncode}"
                           + (f": see {log}" if log else ""))
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "load_before": load0, "load_after": os.getloadavg()[0]}


def write_numbers(name: str, values: dict, command: str | None = None, out_dir: Path = NUMBERS_DIR) -> Path:
    """Write ``<out_dir>/<name>.json`` with the command that reproduces it (default: this script's own command
    line), the date (UTC), the machine and ``values``."""
    if command is None:
        command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    data = {"command": command, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "values": values}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def dir_size_mb(path: Path) -> float:
    """Bytes under ``path`` (files, each counted once), in MB (10^6 bytes)."""
    seen, total = set(), 0
    for p in Path(path).rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total / 1e6


def child_env() -> dict:
    """The environment of a measured child: this one without ``NEUROGUIDE_DATA`` (each measurement uses its own
    ``paths.root_dir``), W&B off, matplotlib headless."""
    env = {k: v for k, v in os.environ.items() if k != "NEUROGUIDE_DATA"}
    env.update(WANDB_MODE="disabled", WANDB_SILENT="true", MPLBACKEND="Agg")
    return env


def run_entry(script: str, overrides: list[str], root: Path, out: Path) -> dict:
    """Run ``python <script> <overrides>`` (train.py, evaluate.py or closed_loop.py) with ``paths.root_dir=root``
    into the folder ``out``; returns its metrics (``out/metrics.json``, the closed loop's ``out/report/metrics.json``)
    with the timing of :func:`timed_run` under ``"_time"``. The console goes to ``out.log``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    where = f"out_dir={out}" if script == "closed_loop.py" else f"hydra.run.dir={out}"
    argv = [sys.executable, script, *overrides, f"paths.root_dir={root}", where]
    print(f"  python {shlex.join(argv[1:])}", flush=True)
    t = timed_run(argv, env=child_env(), log=out.with_suffix(".log"))
    metrics_file = out / "report" / "metrics.json" if script == "closed_loop.py" else out / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["_time"] = t
    return metrics


def train_then_evaluate(name: str, train: list[str], evaluate: list[str], seeds: list[int],
                        ) -> tuple[list[dict], list[dict]]:
    """For each seed, in its own temporary ``paths.root_dir`` (removed after): ``python train.py <train> seed=S``
    into ``<root>/run``, then ``python evaluate.py ckpt=<root>/run/model.ckpt <evaluate>``. Returns the train runs'
    metrics and the evaluations' metrics, one of each per seed, in ``seeds`` order."""
    import shutil
    import tempfile

    trained, evaluated = [], []
    for s in seeds:
        root = Path(tempfile.mkdtemp(prefix=f"ng-numbers-{name}-seed{s}-"))
        trained.append(run_entry("train.py", [*train, f"seed={s}"], root, root / "run"))
        evaluated.append(run_entry("evaluate.py", [f"ckpt={root / 'run' / 'model.ckpt'}", *evaluate], root,
                                   root / "eval"))
        shutil.rmtree(root, ignore_errors=True)
    return trained, evaluated


def fresh_train_runs(command: list[str], seeds: list[int], keep: bool = False) -> list[dict]:
    """``python train.py <command> seed=S`` for each seed as on a fresh machine: its own temporary
    ``paths.root_dir`` (the synthetic data written, a predictor trained on the way, a new run folder), one run at a
    time. Per run: wall and CPU minutes, the load average, the run folder's and ``model.ckpt``'s size (MB) and every
    number of its ``metrics.json`` (``/`` in a name becomes ``_``: ``test/acc`` -> ``test_acc``)."""
    import shutil
    import tempfile

    runs = []
    for seed in seeds:
        root = Path(tempfile.mkdtemp(prefix=f"ng-numbers-seed{seed}-"))
        out = root / "run"
        m = run_entry("train.py", [*command, f"seed={seed}"], root, out)
        t = m.pop("_time")
        rec = {"wall_min": t["wall_s"] / 60, "cpu_min": t["cpu_s"] / 60, "load": (t["load_before"] + t["load_after"]) / 2,
               "run_folder_mb": dir_size_mb(out), "model_ckpt_mb": (out / "model.ckpt").stat().st_size / 1e6}
        rec.update({k.replace("/", "_"): float(v) for k, v in m.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
        print(f"seed {seed}: " + ", ".join(f"{k}={v:.4g}" for k, v in rec.items()), flush=True)
        runs.append(rec)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return runs


def summarize_runs(runs: list[dict], time_digits: int = 1, digits: int = 3) -> dict:
    """Every key common to ``runs`` as a :func:`summary` (times, sizes and the load to ``time_digits``)."""
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {k: summary([r[k] for r in runs], time_digits if k.endswith(("_min", "_mb")) or k == "load" else digits)
            for k in keys}


def seeds_arg(ap, default=(0, 1, 2)) -> None:
    """``--seeds`` (at least 3: a number that varies between runs is reported as mean and spread)."""
    ap.add_argument("--seeds", type=int, nargs="+", default=list(default))


def check_seeds(ap, seeds) -> None:
    if len(seeds) < 3:
        ap.error("a number that varies between runs is reported over >= 3 seeds: give at least 3 --seeds")


def eps_label(tag: str) -> str:
    """``l2_0.25`` -> ``L2 0.25``, ``linf_8_255`` -> ``Linf 8/255``."""
    norm, rest = tag.split("_", 1)
    return f"L2 {rest}" if norm == "l2" else f"Linf {rest.replace('_', '/')}"
