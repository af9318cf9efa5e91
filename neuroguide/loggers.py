"""Loggers: Weights & Biases that never prompts nor loses a run; a CSV logger that keeps its rows across a resume.

Mode: ``WANDB_MODE`` when set (online / offline / disabled); otherwise online when an API key is
available (``WANDB_API_KEY`` or a ``~/.netrc`` entry for api.wandb.ai) and offline when not, with a
message telling how to sync later. Online mode first probes the server (``WANDB_BASE_URL``, default
https://api.wandb.ai: name lookup and TCP connect, :data:`PROBE_TIMEOUT_S` seconds): one that does not
answer makes the run offline, with one warning saying how to upload it later (``wandb sync``), instead of
wandb's 90 s wait and the ``CommError`` that ended the training. A run whose online start fails anyway
falls back to offline the same way: training is never lost to the logger.
"""
from __future__ import annotations

import csv
import logging
import os
import socket
import threading
import uuid
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from neuroguide.utils.io import atomic_path

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


PROBE_TIMEOUT_S = 3.0


def _unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the server of ``url`` cannot be reached within ``timeout`` seconds (name lookup and TCP connect,
    in a thread: a lookup without network can hang far longer), or None when it answers."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (80 if parsed.scheme == "http" else 443)
    result: dict = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result["ok"] = True
        except OSError as e:
            result["error"] = f"{type(e).__name__}: {e}"

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return None if result.get("ok") else result.get("error", f"no answer within {timeout:g} s")


def _warn_offline(why: str, save_dir: str | Path | None) -> None:
    where = Path(save_dir or ".") / "wandb"
    log.warning("W&B: %s; logging offline into %s. Upload later with `wandb sync %s/offline-run-*`",
                why, where, where)


def wandb_mode(save_dir: str | Path | None = None) -> str:
    """The W&B mode (see the module docstring); offline ones are warned about, naming ``save_dir``'s offline runs."""
    mode = os.environ.get("WANDB_MODE")
    if not mode:
        mode = "online" if _has_api_key() else "offline"
        if mode == "offline":
            _warn_offline("no API key found", save_dir)
    if mode == "online":
        url = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
        why = _unreachable(url)
        if why:
            _warn_offline(f"the server {url} is not reachable ({why})", save_dir)
            mode = "offline"
    return mode


class OfflineFallbackWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` whose online start, when it fails, is retried offline (one warning)."""

    @property
    def experiment(self):
        try:
            return super().experiment
        except Exception as e:  # noqa: BLE001 - wandb.errors.CommError, timeouts, ...: training goes on
            if self._wandb_init.get("mode") != "online":
                raise
            _warn_offline(f"the online run did not start ({type(e).__name__}: {str(e)[:300]})", self.save_dir)
            self._wandb_init["mode"], self._offline, self._experiment = "offline", True, None
            os.environ["WANDB_MODE"] = "offline"
            return super().experiment


def forget_inherited_wandb_service() -> None:
    """Drop a ``WANDB_SERVICE`` this process inherited. wandb puts it in the environment for its child processes
    to share its service; a job started from such a process (pytest, a notebook, and on SLURM every attempt of a
    job, which all get the environment of the submission) would log into the parent's service, where the run id
    of an attempt killed for a requeue is still "in use" (``ServerResponseError``). Called first by the entry
    points, before this process starts W&B; its own service is kept by wandb in process, not in the variable."""
    os.environ.pop("WANDB_SERVICE", None)


def wandb_logger(project: str = "neuroguide", group: str | None = None, job_type: str | None = None,
                 tags: list | None = None, save_dir: str = ".", name: str | None = None, **kwargs):
    """A Lightning ``WandbLogger`` in the mode chosen by :func:`wandb_mode`; the run id is kept in
    ``<save_dir>/wandb_run_id.txt`` so a resumed run continues the same W&B run."""
    mode = wandb_mode(save_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_MODE"] = mode  # also keeps wandb.login from prompting
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    id_file = Path(save_dir) / "wandb_run_id.txt"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:8]
        if mode != "disabled":
            with atomic_path(id_file) as tmp:
                tmp.write_text(run_id)
    logger = OfflineFallbackWandbLogger(project=project, group=group, job_type=job_type,
                                        tags=[str(t) for t in (tags or [])], save_dir=save_dir, id=run_id, mode=mode,
                                        offline=mode == "offline", name=name, **kwargs)
    init = getattr(logger, "_wandb_init", {})
    if "anonymous" in init and init["anonymous"] is None:  # Lightning passes anonymous=None, which wandb >= 0.19
        del init["anonymous"]                               # warns about ("The anonymous setting has no effect")
    return logger


def finish_wandb(run, metrics: dict, figures_dir: str | Path | None = None) -> None:
    """The one place a W&B run ends: final ``metrics`` into its summary, the PNG figures below
    ``figures_dir`` as images, then ``finish`` (each job of a multirun finishes its own run). Never
    raises: the results are already on disk, and logging must not lose them."""
    try:
        import wandb

        if hasattr(run, "summary"):
            run.summary.update(metrics)
        if figures_dir is not None and hasattr(run, "log"):
            root = Path(figures_dir)
            for png in sorted(root.rglob("*.png")):
                run.log({str(png.relative_to(root)): wandb.Image(str(png))})
        (run.finish if hasattr(run, "finish") else wandb.finish)()
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.warning("W&B summary not written: %s", e)



class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer without deleting an existing ``metrics.csv``: new rows are appended (the
    header widened when new keys come); :meth:`keep_until` trims the file. A rewrite (widened header, trim)
    writes a new file and renames it: a crash during it keeps the old rows."""

    def _rewrite(self, rows: list[dict], fieldnames: list[str]) -> None:
        with atomic_path(self.metrics_file_path) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fieldnames)
                w.writeheader()
                w.writerows(rows)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        self._rewrite(rows, fieldnames)

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(set(header))

    def keep_until(self, step: int | None) -> None:
        """Keep the rows logged before global step ``step`` (every row of the epochs a checkpoint
        holds); ``None`` keeps none."""
        self.save()
        if not self._fs.isfile(self.metrics_file_path):
            return
        if step is None:
            self._fs.rm_file(self.metrics_file_path)
            self.metrics_keys = []
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
        self._rewrite(kept, self.metrics_keys)


class CSVLogger(_CSVLogger):
    """Lightning's ``CSVLogger`` keeping ``metrics.csv`` across a resume (Lightning's deletes it when
    the folder is reused). :class:`neuroguide.callbacks.ExactResume` calls :meth:`resume_at` with the
    checkpoint's global step (rows logged after it are dropped: the resumed run logs them again), or
    with None when fitting starts from scratch (an earlier run's rows are dropped)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _KeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def resume_at(self, step: int | None) -> None:
        self.experiment.keep_until(step)
