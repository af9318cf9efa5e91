"""The console of ``train.py`` and ``evaluate.py``, set up in one place: each line once, no advertisement,
no known-harmless warnings, a failure's traceback once (:func:`log_failure`), and a closing block saying where the
results are.

Why lines came twice: importing ``lightning`` adds a console handler of its own to the ``lightning`` logger
("INFO: ..." on stderr) while its records also propagate to the root logger, which Hydra gives a console
handler and the run's ``train.log`` / ``evaluate.log``. (``lightning.pytorch`` and ``lightning.fabric`` add one
more each, and stop propagating, when imported before Hydra sets up logging.) :func:`setup_console` removes
Lightning's console handlers and lets its records propagate: each line once on the console, once in the file.

A log file that cannot be written any more (a full disk) is said once on stderr and then left alone: the
console keeps every line (Python's logging would print a "--- Logging error ---" traceback per record).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Iterable

log = logging.getLogger("neuroguide")

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
# log records dropped, by the start of their message, at the logger that emits them
HIDDEN_MESSAGES = {
    # Lightning >= 2.6 advertises its cloud logger at every Trainer(...)
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip: For seamless cloud logging",),
    "pytorch_lightning.utilities.rank_zero": ("💡 Tip: For seamless cloud logging",),
}
# (message regex, matched at its start; category name; when: "always" or "outside SLURM"; why it is harmless)
HARMLESS_WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "FutureWarning", "always",
     "Lightning 2.6's own pytree helper (lightning/pytorch/utilities/_pytree.py) against torch >= 2.10; "
     "nothing in this project calls it"),
    (r"The `srun` command is available on your system but is not used", "PossibleUserWarning", "outside SLURM",
     "a machine with SLURM installed, a run outside any allocation: a local run, as asked (cluster jobs go "
     "through hydra/launcher=slurm_* or slurm/*.sbatch, which use srun); inside an allocation it still shows"),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: Iterable[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_warnings() -> None:
    """Ignore the known-harmless warnings of :data:`HARMLESS_WARNINGS` (by message; every other warning shows)."""
    import os

    from lightning.fabric.utilities.warnings import PossibleUserWarning

    categories = {"FutureWarning": FutureWarning, "PossibleUserWarning": PossibleUserWarning}
    for message, category, when, _why in HARMLESS_WARNINGS:
        if when == "outside SLURM" and os.environ.get("SLURM_JOB_ID"):
            continue
        warnings.filterwarnings("ignore", message=message, category=categories[category])


def _quiet_when_unwritable(handler: logging.FileHandler) -> None:
    """On the first failed write, one line on stderr; the handler then drops every record."""
    def handle_error(record: logging.LogRecord) -> None:
        handler.setLevel(logging.CRITICAL + 1)
        with contextlib.suppress(Exception):
            handler.close()
        sys.stderr.write(f"cannot write the log file {handler.baseFilename} ({sys.exc_info()[1]}): its lines from "
                         "here on are on the console only\n")

    handler.handleError = handle_error


def setup_console() -> None:
    """Call first thing inside a Hydra task function (after Hydra has set up the root logger's handlers)."""
    import lightning  # noqa: F401  (importing it adds the handlers replaced here)
    import lightning.pytorch  # noqa: F401

    if logging.getLogger().handlers:  # Hydra's console + file handlers: Lightning's records go there, once
        for name in LIGHTNING_LOGGERS:
            lg = logging.getLogger(name)
            for h in list(lg.handlers):
                if type(h) is logging.StreamHandler:  # Lightning's console handlers (not a FileHandler)
                    lg.removeHandler(h)
            lg.propagate = True
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            _quiet_when_unwritable(h)
    for name, prefixes in HIDDEN_MESSAGES.items():
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in lg.filters):
            lg.addFilter(_DropMessages(prefixes))
    quiet_warnings()


def log_failure(what: str) -> None:
    """The exception being handled, with its traceback, into the run's log files only (``train.log``,
    ``evaluate.log``: Hydra's file handlers). Re-raised, Hydra prints it on the console ("Error executing job
    ..."), so the traceback shows once on the console and once in the file."""
    import sys

    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, what, (), sys.exc_info())
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler) and record.levelno >= h.level:
            h.handle(record)


def log_outputs(title: str, out: Path, files: dict[str, Path | None], figures: Iterable[Path] = (),
                max_figures: int = 6) -> None:
    """The closing block of a run: its folder, the named files that exist, and its figures."""
    out = Path(out)
    lines = [f"{title}: {out}"]
    width = max([len(k) for k in files] + [len("figures")])
    for label, path in files.items():
        if path is not None and Path(path).exists():
            lines.append(f"  {label:<{width}}  {path}")
    figures = sorted(Path(f) for f in figures)
    if figures:
        shown = [str(f.relative_to(out)) if f.is_relative_to(out) else str(f) for f in figures[:max_figures]]
        more = f" (+{len(figures) - max_figures} more)" if len(figures) > max_figures else ""
        lines.append(f"  {'figures':<{width}}  {', '.join(shown)}{more}")
    else:
        lines.append(f"  {'figures':<{width}}  none")
    log.info("\n".join(lines))
