"""Weights & Biases logger that never prompts.

Mode: ``WANDB_MODE`` when set (online / offline / disabled); otherwise online when an API key is
available (``WANDB_API_KEY`` or a ``~/.netrc`` entry for api.wandb.ai) and offline when not, with a
message telling how to sync later.
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode() -> str:
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if _has_api_key() else "offline"


def wandb_logger(project: str = "neuroguide", group: str | None = None, job_type: str | None = None,
                 tags: list | None = None, save_dir: str = ".", name: str | None = None, **kwargs):
    """A Lightning ``WandbLogger`` in the mode chosen by :func:`wandb_mode`; the run id is kept in
    ``<save_dir>/wandb_run_id.txt`` so a resumed run continues the same W&B run."""
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode()
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_MODE"] = mode  # also keeps wandb.login from prompting
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    id_file = Path(save_dir) / "wandb_run_id.txt"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:8]
        if mode != "disabled":
            id_file.write_text(run_id)
    if mode == "offline":
        log.warning("W&B: no API key found, logging offline into %s; upload later with "
                    "`wandb sync %s/wandb/offline-run-*`", save_dir, save_dir)
    logger = WandbLogger(project=project, group=group, job_type=job_type, tags=[str(t) for t in (tags or [])],
                         save_dir=save_dir, id=run_id, mode=mode,
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
