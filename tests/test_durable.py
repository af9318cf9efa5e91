"""Nothing lost, nothing silently wrong: run folders, full disks, W&B without network, cut-short files.

- one writer per run folder: a second run of the folder is refused at once, naming the first (pid, host,
  start time); a killed holder leaves no stuck lock; only rank 0 takes it;
- a full disk: one :class:`DiskFull` error naming the folder and the space needed, nothing partial under a
  final name (a simulated 60 MB disk with the system's temporary folder on another file system, as Lightning
  used it; and, as root, a real 60 MB tmpfs);
- W&B with an API key and no server: offline within seconds, with one warning saying how to sync;
- a cut-short metrics.json is named and skipped by the report; a crashed run is listed as failed by
  ``evaluate.py sweep_dir=...``; a truncated last.ckpt is moved aside; a moved predictor is found by content.
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml

from conftest import evaluate_in, small_overrides

REPO = Path(__file__).resolve().parents[1]
CHEAP_EVAL = ("eval=[robustness]", "n_images=4", "eval.robustness.eps_l2=[0.5]", "eval.robustness.eps_linf=[0.01]",
              "eval.robustness.steps=1")
SMALL_RUN = ("task=predictor", "region=V1", "task.max_epochs=1", "+trainer.limit_train_batches=2",
             "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1")

HOLD = """
import sys, time
from neuroguide.utils.run_lock import one_writer
with one_writer(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """holder(folder) -> a child process holding ``folder``'s run lock (killed at the end)."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        procs.append(p)
        line = p.stdout.readline()
        assert line.strip() == "held", p.stderr.read()
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


# ----------------------------------------------------------------------------- 5. one writer per run folder
def test_a_second_run_of_a_folder_is_refused_naming_the_first(compose_train, tmp_path, holder):
    from neuroguide.train import run

    out = tmp_path / "run"
    first = holder(out)
    t0 = time.time()
    with pytest.raises(RuntimeError, match="is being written by another run") as err:
        run(compose_train(*SMALL_RUN))
    msg = str(err.value)
    assert str(out) in msg and f"pid {first.pid} on {socket.gethostname()}, started 20" in msg
    assert "hydra.run.dir=" in msg and time.time() - t0 < 10  # refused at once, with the fix
    assert sorted(p.name for p in out.iterdir()) == [".run.lock"]  # it wrote nothing into the folder


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path, holder, monkeypatch):
    from neuroguide.utils.run_lock import RunFolderBusy, lock_holder, one_writer

    folder = tmp_path / "run"
    p = holder(folder)
    assert lock_holder(folder)["pid"] == p.pid
    monkeypatch.setenv("LOCAL_RANK", "1")  # another rank of a DDP run writes nothing: it takes no lock
    with one_writer(folder):
        pass
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(RunFolderBusy):
        with one_writer(folder):
            pass
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert json.loads((folder / ".run.lock").read_text())["pid"] == p.pid  # its file is still there, unlocked
    assert lock_holder(folder) is None
    with one_writer(folder):  # taken over at once
        assert lock_holder(folder)["pid"] == os.getpid()
    assert not (folder / ".run.lock").exists()


def _train_cmd(tmp: Path, run_dir: Path) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "task=predictor", "region=V1", "task.max_epochs=3",
            "task.batch_size=16", f"hydra.run.dir={run_dir}", *small_overrides(tmp)]


@pytest.mark.slow
def test_two_train_py_of_one_config_at_once(tmp_path):
    """The same command twice at once: the second stops at once naming the first, which finishes with the
    metrics.csv of a run alone (one validation and one training row per epoch, the best checkpoint's validation
    and test rows, no row twice; two writers interleaved and misaligned rows)."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="disabled")
    first = subprocess.Popen(_train_cmd(tmp_path, run_dir), cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    while not (run_dir / "csv").exists() and first.poll() is None:  # the first is training
        time.sleep(0.2)
    second = subprocess.run(_train_cmd(tmp_path, run_dir), cwd=REPO, env=env, capture_output=True, text=True)
    out_first = first.communicate(timeout=600)[0]
    assert first.returncode == 0, out_first[-3000:]
    assert second.returncode != 0
    assert f"{run_dir} is being written by another run: pid {first.pid} on {socket.gethostname()}" in second.stderr
    import csv

    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    val_epochs = [r["epoch"] for r in rows if r.get("val/r_median")]
    assert val_epochs == ["0", "1", "2", "3"]  # 3: the best checkpoint validated again after fitting
    assert len(rows) == 8 and [r["epoch"] for r in rows if r.get("test/r_median")] == ["3"]  # + 3 train rows, 1 test
    keys = [(r["epoch"], r["step"], tuple(k for k, v in sorted(r.items()) if v)) for r in rows]
    assert len(keys) == len(set(keys))


# ----------------------------------------------------------------------------- 6. a full disk
Usage = namedtuple("Usage", "total used free")


class _SmallDisk:
    """Files under ``root`` live on a ``limit``-byte disk (writes past it raise ENOSPC after writing what
    fits); the system's temporary folder is on another file system (a rename from it into ``root`` fails
    with EXDEV, as from /tmp to a cluster disk). ``lie``: disk_usage reports 1 TB free (a quota, or
    another writer filling the disk after the check)."""

    def __init__(self, root: Path, limit: int, monkeypatch, lie: bool = False):
        self.root, self.limit, self.used, self.lie = root.resolve(), limit, 0, lie
        real_open, real_rename, real_usage = builtins.open, os.rename, shutil.disk_usage
        disk = self

        class Limited:
            def __init__(self, f):
                self._f = f

            def write(self, data):
                raw = data.encode() if isinstance(data, str) else memoryview(data).cast("B")
                room = disk.limit - disk.used
                if len(raw) > room:
                    if not isinstance(data, str):
                        self._f.write(raw[:max(room, 0)])
                    disk.used = disk.limit
                    raise OSError(errno.ENOSPC, "No space left on device")
                disk.used += len(raw)
                return self._f.write(data)

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

            def __iter__(self):
                return iter(self._f)

        def small_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax") and disk.inside(file):
                return Limited(f)
            return f

        def rename(src, dst, *args, **kwargs):
            if disk.inside(dst) and not disk.inside(src):
                raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
            return real_rename(src, dst, *args, **kwargs)

        def disk_usage(path):
            if disk.inside(path):
                return Usage(disk.limit, disk.used, 10**12 if disk.lie else disk.limit - disk.used)
            return real_usage(path)

        tmp = root.parent / "system_tmp"
        tmp.mkdir(exist_ok=True)
        monkeypatch.setattr(builtins, "open", small_open)
        monkeypatch.setattr(io, "open", small_open)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(shutil, "disk_usage", disk_usage)
        monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", False)
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))

    def inside(self, path) -> bool:
        return Path(os.path.abspath(path)).is_relative_to(self.root)


def _ckpt_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and ".ckpt" in p.name)


def test_a_full_disk_stops_the_run_with_one_clear_error_and_no_partial_checkpoint(compose_train, tmp_path,
                                                                                   monkeypatch):
    from neuroguide.train import run

    cfg = compose_train(*SMALL_RUN, out="small/run")  # data and predictors outside the small disk
    (tmp_path / "small").mkdir()
    _SmallDisk(tmp_path / "small", 60_000_000, monkeypatch)
    with pytest.raises(OSError) as err:
        run(cfg)
    msg = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert f"no room to write {tmp_path / 'small' / 'run' / 'checkpoints'}/best.ckpt" in msg
    assert "MB free, the file needs 1" in msg and "paths.log_dir=" in msg  # a ResNet18 with Adam state: >100 MB
    assert _ckpt_names(tmp_path / "small") == []  # no partial best.ckpt, no temporary left
    assert not (tmp_path / "small" / "run" / ".run.lock").exists()


def test_a_write_that_fills_the_disk_keeps_the_old_file_and_names_the_folder(tmp_path, monkeypatch):
    from neuroguide.models.checkpoints import save_model_file
    from neuroguide.utils.io import read_json, write_json

    folder = tmp_path / "small"
    write_json(folder / "metrics.json", {"a": 1.0})
    disk = _SmallDisk(folder, 4096, monkeypatch, lie=True)  # the check finds room, the write does not
    with pytest.raises(OSError, match=f"no room to write {folder}/model.ckpt: {folder} has 1000000.0 MB free, the "
                                      r"file needs 4\d.\d kB, but writing it ran out of room \(a disk quota"):
        save_model_file(folder / "model.ckpt", "predictor", {"arch": "resnet18", "n_outputs": 2},
                        {"w": torch.zeros(10_000)})
    disk.lie = False
    disk.used = 4000
    with pytest.raises(OSError, match=f"no room to write {folder}/metrics.json: {folder} has 0.1 kB free, the file "
                                      r"needs 0.\d kB \(free at least 0.\d kB more there\)"):
        write_json(folder / "metrics.json", {"a": 2.0, "b": list(range(100))})
    assert read_json(folder / "metrics.json") == {"a": 1.0}  # the old one, whole
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json"]


def _tmpfs(mountpoint: Path, size: str = "60m") -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    mountpoint.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_train_py_on_a_real_60_mb_disk(tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk):
        pytest.skip("needs root and `mount -t tmpfs` (a real 60 MB file system)")
    try:
        res = subprocess.run(_train_cmd(tmp_path, disk / "run") + [f"paths.log_dir={disk}"], cwd=REPO,
                             env=dict(os.environ, WANDB_MODE="disabled"), capture_output=True, text=True, timeout=600)
        out = res.stdout + res.stderr
        assert res.returncode == 1
        assert f"no room to write {disk}/run/checkpoints/best.ckpt: {disk}/run/checkpoints has" in out
        assert "--- Logging error ---" not in out and out.count("Traceback") == 1  # Hydra's, of the one error
        assert _ckpt_names(disk) == []
        assert "train.py stopped: [Errno 28] no room to write" in (disk / "run" / "train.log").read_text()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ----------------------------------------------------------------------------- 7. W&B without network
def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_wandb_with_a_key_and_no_server_goes_offline_at_once_and_trains(compose_train, tmp_path, monkeypatch,
                                                                         caplog):
    from neuroguide.loggers import wandb_logger
    from neuroguide.train import run

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    t0 = time.time()
    with caplog.at_level(logging.WARNING):
        logger = wandb_logger(save_dir=str(tmp_path / "probe"))
        logger.experiment.finish()
    assert time.time() - t0 < 20  # wandb's own wait was 90 s, then a CommError
    assert "is not reachable" in caplog.text and f"wandb sync {tmp_path / 'probe' / 'wandb'}/offline-run-*" in caplog.text
    monkeypatch.delenv("WANDB_MODE", raising=False)  # wandb_logger sets it for the process: probe again
    metrics = run(compose_train(*SMALL_RUN, "logger=default"))
    assert (tmp_path / "run" / "metrics.json").exists() and "test/r_median" in metrics
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_an_online_start_that_fails_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    import wandb

    from neuroguide import loggers

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setattr(loggers, "_unreachable", lambda *a, **k: None, raising=False)  # the probe passes
    real_init = wandb.init

    def init(*args, **kwargs):
        if kwargs.get("mode") == "online":
            raise wandb.errors.CommError("Failed to get resume status: context deadline exceeded")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    with caplog.at_level(logging.WARNING):
        logger = loggers.wandb_logger(save_dir=str(tmp_path))
        run = logger.experiment
    assert run.settings.mode == "offline" and "the online run did not start (CommError" in caplog.text
    assert "wandb sync" in caplog.text
    run.finish()


# ----------------------------------------------------------------------------- 8. cut-short and unfinished runs
def _run_folder(root: Path, name: str, acc: float | None) -> Path:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    config = {"task": {"name": "guidance"}, "region": {"name": "TO"}, "alpha": 0.5, "at": {"eps": 0.0}, "seed": 0}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if acc is not None:  # finished
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        (d / "metrics.json").write_text(json.dumps({"val/acc": acc, "val/neural_r": 0.25}, indent=2))
    return d


def test_report_names_skips_and_counts_a_cut_short_metrics_json(tmp_path, caplog, capsys):
    from neuroguide.report import main

    _run_folder(tmp_path, "seed0", 0.75)
    cut = _run_folder(tmp_path, "seed1", 0.5)
    text = (cut / "metrics.json").read_text()
    (cut / "metrics.json").write_text(text[: len(text) // 2])
    _run_folder(tmp_path, "seed2", None)  # crashed: no metrics.json
    with caplog.at_level(logging.WARNING):
        main([str(tmp_path)])
    md = (tmp_path / "report.md").read_text()
    assert "| seed0 | 0.75 | 0.25 |" in md
    assert "seed1" not in md.split("not in the table")[0] and "seed2" not in md.split("not in the table")[0]
    assert "**2 run folder(s) not in the table:**" in md
    assert f"- `seed1`: {cut / 'metrics.json'} is not valid JSON" in md
    assert "- `seed2`: no metrics.json: the run did not finish" in md
    assert f"left out seed1: {cut / 'metrics.json'} is not valid JSON" in caplog.text
    assert "1 runs ->" in capsys.readouterr().out and "2 run folder(s) left out" in caplog.text


def test_evaluate_sweep_lists_a_crashed_run_as_failed(guided_ckpts, tmp_path):
    from neuroguide.evaluation.runner import EvaluationFailed

    _, paths = guided_ckpts
    sweep = tmp_path / "sweep"
    ok = _run_folder(sweep, "alpha0.5", 0.5)
    shutil.copy(paths[0], ok / "model.ckpt")
    crashed = _run_folder(sweep, "alpha1.0", None)
    (crashed / "train.log").write_text("RuntimeError: CUDA out of memory\n")
    with pytest.raises(EvaluationFailed) as err:
        evaluate_in(tmp_path, "ev", f"sweep_dir={sweep}", *CHEAP_EVAL)
    key = "alpha1.0/eval/model/failed"
    assert err.value.failures == {key: f"no model.ckpt: the run did not finish (crashed or killed: see "
                                       f"{crashed / 'train.log'})"}
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())[key].startswith("no model.ckpt")
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "| alpha0.5 |" in md and "- `alpha1.0`: no metrics.json: the run did not finish" in md


def test_a_truncated_last_ckpt_is_moved_aside_and_the_run_starts_afresh(compose_train, tmp_path, caplog):
    from neuroguide.train import run

    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 3}, buf)
    cut = buf.getvalue()[: len(buf.getvalue()) // 2]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(cut)
    with caplog.at_level(logging.WARNING, logger="neuroguide"):
        metrics = run(compose_train(*SMALL_RUN))
    aside = list((tmp_path / "run").glob("last.ckpt.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == cut  # kept for inspection, outside checkpoints/
    assert f"{last} is not a readable checkpoint" in caplog.text and f"Moved it aside to {aside[0]}" in caplog.text
    assert "starting the run afresh" in caplog.text
    assert metrics["selected_epoch"] == 0.0 and (tmp_path / "run" / "metrics.json").exists()


def test_a_moved_predictor_is_found_by_content_under_the_current_predictors_dir(guided_ckpts, tmp_path, caplog):
    from neuroguide.models.checkpoints import load_model, save_model_file
    from neuroguide.models.registry import build_model
    from neuroguide.utils.io import file_sha256, pin_by_content

    _, paths = guided_ckpts
    guided = load_model(paths[0])
    info = guided.neuroguide_info
    old, new = tmp_path / "predictors_old", tmp_path / "predictors_new"
    pred_cfg = dict(info["model_config"]["predictor"])
    torch.manual_seed(5)
    predictor = build_model("predictor", **pred_cfg)
    src = save_model_file(old / "subj01" / "TO.ckpt", "predictor", pred_cfg, predictor.state_dict(),
                          facts={"region": "TO", "subject": 1, "image_size": 16})
    pinned = pin_by_content(src).resolve()
    ref = {"predictor.": {"path": str(pinned), "sha256": file_sha256(pinned)}}
    model_file = save_model_file(tmp_path / "guided" / "model.ckpt", "guidance", info["model_config"],
                                 guided.state_dict(), info["run_config"], facts=info["facts"], references=ref)
    shutil.move(old, new)
    with pytest.raises(FileNotFoundError, match="which does not exist"):
        load_model(model_file)
    m, _ = evaluate_in(tmp_path, "ev", f"ckpt={model_file}", *CHEAP_EVAL, f"paths.predictors_dir={new}")
    assert "eval/robustness/clean/acc" in m and not [k for k in m if k.endswith("failed")]
    x = torch.rand(2, 3, 16, 16)
    for _ in ("named", "hashed"):  # by its content-named copy, then (that gone) by hashing the others
        with caplog.at_level(logging.INFO, logger="neuroguide"):
            found = load_model(model_file, search=[new])
        torch.testing.assert_close(found.predictor_target(x), predictor.eval()(x))
        assert f"using {new / 'subj01'}" in caplog.text and "the same content" in caplog.text
        shutil.rmtree(new / "subj01" / ".by-sha256", ignore_errors=True)
