"""The console of train.py: each line once (and once in train.log), no litlogger advertisement, a line when
the synthetic data are written, a closing block naming the run's files; the ``${ng_cpus:}`` resolver."""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import small_overrides
from neuroguide.config import available_cpus, compose_config

REPO = Path(__file__).resolve().parents[1]
PREFIX = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]\[[^\]]+\]\[[A-Z]+\] - ")  # Hydra's "[time][logger][LEVEL] - "
LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR): ")  # Lightning's own console format "INFO: ..."
PROGRESS = re.compile(r"\d+/\d+ \[|it/s\]|s/it\]|\|\s*\d+/\?|^\s*\x1b\[A|^\s*\[A")  # tqdm bars and their cursor moves


def _lines(text: str) -> list[str]:
    """Console or log lines without timestamps, blank lines and progress bars."""
    out = []
    for line in re.split(r"[\r\n]", text):
        line = LEVEL.sub("", PREFIX.sub("", line)).rstrip()
        if line.strip() and not PROGRESS.search(line):
            out.append(line)
    return out


@pytest.mark.slow  # a CLI run in a subprocess, or a training of ~15 s: the full suite runs it
def test_train_console_says_each_thing_once(tmp_path):
    cmd = [sys.executable, str(REPO / "train.py"), "task=predictor", "region=V1", "task.max_epochs=2",
           "+trainer.limit_train_batches=2", *small_overrides(tmp_path)]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    console = p.stdout + "\n" + p.stderr
    assert "litlogger" not in console and "Tip:" not in console
    assert "LeafSpec" not in console  # a known-harmless warning, filtered by message
    assert not re.search(r"^INFO: ", console, re.M)  # Lightning's own console handler is gone
    lines = _lines(console)
    assert sum("writing the synthetic NSD data to" in ln and "(first use)" in ln for ln in lines) == 1
    # the closing block: the run folder, then its files
    start = max(i for i, ln in enumerate(lines) if ln.startswith("run folder: "))
    run = Path(lines[start][len("run folder: "):])
    block = dict(ln.split(None, 1) for ln in lines[start + 1:start + 7] if ln.startswith("  "))
    assert Path(block["model"]) == run / "model.ckpt" and (run / "model.ckpt").is_file()
    assert Path(block["metrics"]) == run / "metrics.json" and (run / "metrics.json").is_file()
    assert block["figures"] == "learning_curves.png" and (run / "learning_curves.png").is_file()
    assert run.parent == tmp_path / "outputs" / "predictor" and run.name.startswith("task-predictor_region-V1_cfg-")
    # each line once on the console: never more often than train.log holds it (Lightning's lines included)
    log_lines = _lines((run / "train.log").read_text())
    assert any("Trainable params" in ln for ln in log_lines) and any("GPU available" in ln for ln in log_lines)
    in_log = collections.Counter(log_lines)
    twice = {ln: n for ln, n in collections.Counter(lines).items() if n > max(1, in_log[ln])}
    assert not twice, twice


def test_ng_cpus_is_the_machines_count_capped_at_8():
    n = len(os.sched_getaffinity(0))
    assert available_cpus() == min(8, n) and available_cpus(None) == n and available_cpus(1) == 1
    cfg = compose_config("train", ["data=nsd", "paths.nsd_root=/nowhere"], output_dir="/tmp/unused")
    assert cfg.data.num_workers == min(8, n) == cfg.task.datamodule.num_workers
    assert OmegaConf.create({"w": "${ng_cpus:2}"}).w == min(2, n)
