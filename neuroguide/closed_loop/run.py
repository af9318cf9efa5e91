"""``closed_loop.py``: the composed config -> one step of :class:`neuroguide.closed_loop.steps.Loop`."""
from __future__ import annotations

import logging
import time

import torch
from omegaconf import DictConfig, OmegaConf

from neuroguide.closed_loop import layout
from neuroguide.closed_loop.steps import MODEL, RECORDINGS, STIMULI, Loop

log = logging.getLogger("neuroguide")
STEPS = ("propose", "record", "refit", "report", "simulate")


def make_loop(cfg: DictConfig) -> Loop:
    loop = OmegaConf.to_container(cfg.loop, resolve=True)
    return Loop(loop, cfg.out_dir, device=str(cfg.device), progress=bool(cfg.progress),
                robust_weights=_plain(cfg.paths.get("robust_weights")),
                allow_empty_sites=bool(cfg.allow_empty_sites))


def _refit_day(loop: Loop) -> int:
    """The first day whose recordings exist but whose refit (the next day's model) does not."""
    t = 0
    while (layout.day_dir(loop.out, t + 1) / MODEL).is_file():
        t += 1
    return t


def run(cfg: DictConfig) -> dict | None:
    """Run ``cfg.step`` (see conf/closed_loop.yaml); returns the report's metrics for report / simulate."""
    if cfg.step not in STEPS:
        raise ValueError(f"step={cfg.step!r}: expected one of {STEPS}")
    threads = torch.get_num_threads()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DictConfig) -> dict | None:
    loop = make_loop(cfg)
    start = time.time()
    day = cfg.get("day")
    if cfg.step == "propose":
        out = loop.propose(loop.first_missing(STIMULI) if day is None else int(day))
    elif cfg.step == "record":
        out = loop.record(loop.first_missing(RECORDINGS) if day is None else int(day))
    elif cfg.step == "refit":
        out = loop.refit(_refit_day(loop) if day is None else int(day), cfg.get("recordings"))
    elif cfg.step == "report":
        out = loop.report()
    else:
        out = loop.simulate(int(cfg.days))
    log.info("closed_loop step=%s done in %.0f s: %s", cfg.step, time.time() - start,
             loop.out / "report" if isinstance(out, dict) else out)
    return out if isinstance(out, dict) else None


def _plain(node) -> dict:
    return dict(OmegaConf.to_container(node, resolve=True)) if node is not None else {}
