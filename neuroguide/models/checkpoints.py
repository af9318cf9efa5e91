"""Checkpoints: the one safe loader, the one way to build a model from a checkpoint.

A neuroguide checkpoint (Lightning's ``.ckpt`` or the exported model file) holds
``hyper_parameters = {"task_name", "model_kind", "model_config", "facts", "run_config"}``:
``model_config`` is exactly what the builder of ``model_kind`` (:mod:`neuroguide.models.registry`)
takes, so :func:`load_model` rebuilds the network without Hydra, the data or the task; ``facts`` are
the run facts a reader looks things up by (region, subject, alpha, at_eps, image_size, ...) and
``run_config`` the whole resolved run config. Every file is read with
``torch.load(..., weights_only=True)``: a file holding a pickled callable is refused. Every file is written by
:func:`save_torch`: serialised in memory, checked against the folder's free space, written to a temporary name
beside its final one and renamed (a full disk is one :class:`~neuroguide.utils.io.DiskFull` error naming the
folder and the space needed, and nothing partial keeps the final name).

Frozen parts stored elsewhere (a guided classifier's predictor, 45 MB, the same file for every run
guided by that region) are kept **by reference**: ``hyper_parameters["references"] =
{"predictor.": {"path", "sha256"}}`` and no weights under that prefix. :func:`load_model` reads the
referenced file, checks its content hash and puts its weights back under the prefix. A referenced file that
is not at its stored path any more (the predictors folder was moved) is looked up by content below the
folders given as ``search`` (e.g. the current ``paths.predictors_dir``): first by its content-named copy
``.by-sha256/<sha256>.ckpt``, then by hashing the other ``.ckpt`` files there.
"""
from __future__ import annotations

import io
import logging
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroguide.models.registry import build_model, split_model_config
from neuroguide.utils.io import atomic_write_bytes, file_sha256

FORMAT = "neuroguide-model-v2"
FORMATS = ("neuroguide-model-v1", FORMAT)
log = logging.getLogger("neuroguide")


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (check the path, or train the model first)")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is not a readable checkpoint: the file is empty (0 bytes). It was probably cut "
                         "off while being written or copied; copy it again or retrain the model")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
        msg = str(e)
        if "GLOBAL" in msg or "Unsupported global" in msg:  # a real pickle that names Python objects
            names = [ln.strip() for ln in msg.splitlines() if "GLOBAL" in ln or "Unsupported global" in ln]
            raise ValueError(
                f"refusing to load {path}: it holds Python objects (such as a pickled callable) that a weights-only "
                f"load does not run ({names[0] if names else 'unsupported global'}). Re-save it as a plain state "
                "dict of tensors (torch.save(model.state_dict(), path)) from code you trust") from None
        kind = "a zip archive" if zipfile.is_zipfile(path) else "not a torch zip archive"
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and "weights_only" not in ln]
        detail = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "")
        reason = f"{type(e).__name__}: {detail[:200]}" if detail else type(e).__name__
        raise ValueError(
            f"{path} is not a readable checkpoint ({size} bytes, {kind}; torch.load said: {reason}). It is "
            "corrupted, truncated or not a PyTorch file: copy it again, or retrain the model") from None


def save_model_file(path: str | os.PathLike, model_kind: str, model_config: dict, state_dict: dict,
                    run_config: dict | None = None, metrics: dict | None = None, facts: dict | None = None,
                    task_name: str | None = None, references: dict | None = None) -> Path:
    """Write an exported model (weights + the config to rebuild it), atomically. ``references``:
    ``{prefix: {"path", "sha256"}}`` parts stored by reference (their weights are left out)."""
    references = dict(references or {})
    obj = {
        "format": FORMAT,
        "hyper_parameters": {"task_name": task_name or model_kind, "model_kind": model_kind,
                             "model_config": dict(model_config), "facts": dict(facts or {}),
                             "run_config": run_config or {}, "references": references},
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()
                       if not any(k.startswith(p) for p in references)},
        "metrics": dict(metrics or {}),
    }
    return save_torch(obj, path)


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` into ``path`` atomically, after checking its folder has room for the bytes
    (:class:`~neuroguide.utils.io.DiskFull` naming the folder and the space needed if not)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getbuffer())


def set_aside_unreadable(path: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path | None:
    """Move an unreadable checkpoint (truncated, corrupted) to ``<folder>/<name>.corrupt-<YYYYmmdd-HHMMSS>``
    (``folder``: default beside it) and warn, naming both and what was wrong; returns the new path, or None
    when ``path`` reads (or is absent)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        safe_torch_load(path)
        return None
    except ValueError as e:
        aside = Path(folder or path.parent) / f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(path, aside)
        log.warning("%s. Moved it aside to %s (kept for inspection; delete it when not needed) and starting the "
                    "run afresh instead of resuming from it", e, aside)
        return aside


@dataclass
class Checkpoint:
    """What a neuroguide checkpoint holds (see the module docstring)."""

    path: Path
    task_name: str
    model_kind: str
    model_config: dict
    facts: dict
    run_config: dict
    state_dict: dict = field(repr=False)
    metrics: dict = field(default_factory=dict)
    references: dict = field(default_factory=dict)

    def info(self) -> dict:
        """The ``neuroguide_info`` a loaded model carries."""
        return {"task_name": self.task_name, "model_kind": self.model_kind, "model_config": self.model_config,
                "facts": self.facts, "run_config": self.run_config, "path": str(self.path)}


def read_checkpoint(path: str | os.PathLike, kind: str | None = None) -> Checkpoint:
    """The contents of a neuroguide checkpoint; ``kind``: refuse a model of another kind."""
    ckpt = safe_torch_load(path)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hp or "task_name" not in hp or "model_config" not in hp or "state_dict" not in ckpt:
        raise ValueError(
            f"{path} is not a neuroguide checkpoint (no hyper_parameters.task_name/model_config). "
            "Use a .ckpt written by `python train.py` or neuroguide.models.checkpoints.save_model_file")
    task_name = hp["task_name"]
    model_kind = hp.get("model_kind") or task_name
    if kind is not None and model_kind != kind:
        raise ValueError(f"{path} holds a {model_kind!r} model, not a {kind!r} model: pass a checkpoint of a "
                         f"{kind} run")
    # files written before model_config and run facts were split (or by hand) may mix them: separated here
    model_config, old_facts = split_model_config(model_kind, dict(hp["model_config"]))
    facts = {**old_facts, **dict(hp.get("facts") or {})}
    sd = ckpt["state_dict"]
    if ckpt.get("format") not in FORMATS:  # Lightning checkpoint: the task's weights live under "model."
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return Checkpoint(Path(path), task_name, model_kind, model_config, facts, dict(hp.get("run_config") or {}),
                      sd, dict(ckpt.get("metrics") or {}), dict(hp.get("references") or {}))


def find_by_content(sha256: str, suffix: str, search: tuple | list = ()) -> Path | None:
    """A file below one of the ``search`` folders whose content has this SHA-256: its content-named copy
    ``<sha256><suffix>`` (``.by-sha256/``) first, else any other ``*<suffix>`` file there (each one hashed)."""
    roots = [Path(r) for r in search if r and Path(r).is_dir()]
    named = [p for r in roots for p in sorted(r.rglob(f"{sha256}{suffix}"))]
    others = [p for r in roots for p in sorted(r.rglob(f"*{suffix}")) if p.name != f"{sha256}{suffix}"]
    return next((p for p in named + others if p.is_file() and file_sha256(p) == sha256), None)


def check_reference(prefix: str, ref: dict, owner: str | os.PathLike, search: tuple | list = ()) -> Path:
    """The referenced file of ``owner``'s part ``prefix``, after checking it exists and has the stored hash;
    one missing or changed there is looked up by content below the ``search`` folders (:func:`find_by_content`)."""
    path = Path(ref["path"])
    what = f"{owner} keeps its frozen {prefix.rstrip('.')} by reference to {path}"
    missing = not path.is_file()
    if not missing and (not ref.get("sha256") or file_sha256(path) == ref["sha256"]):
        return path
    found = find_by_content(ref["sha256"], path.suffix, search) if ref.get("sha256") else None
    if found is not None:
        log.info("%s, %s: using %s, the same content (sha256 %s...)", what,
                 "which does not exist" if missing else "which has changed", found, ref["sha256"][:12])
        return found
    looked = f" nor anywhere below {', '.join(map(str, search))} (by content)" if search else ""
    if missing:
        raise FileNotFoundError(f"{what}, which does not exist{looked}. Copy that file there (it is the trained "
                                "model of the run's paths.predictors_dir), pass the folder it moved to as "
                                "paths.predictors_dir, or retrain the guided model")
    raise ValueError(f"{what}, but that file has changed since (content hash differs){looked}: it was retrained or "
                     "replaced. Restore the original file, or retrain the guided model with the new one")


def referenced_state(references: dict, owner: str | os.PathLike, search: tuple | list = ()) -> dict:
    """The weights of every referenced part, keyed with their prefix (hash-checked; ``search``: folders where
    a moved file is looked up by content, see :func:`check_reference`)."""
    out = {}
    for prefix, ref in references.items():
        sd = read_checkpoint(check_reference(prefix, ref, owner, search)).state_dict
        out.update({prefix + k: v for k, v in sd.items()})
    return out


def load_model(path: str | os.PathLike, map_location: Any = "cpu", eval_mode: bool = True,
               kind: str | None = None, search: tuple | list = ()) -> nn.Module:
    """Rebuild the model stored in ``path`` (no Hydra needed), with its weights, in eval mode.

    The returned module takes images (B, 3, H, W) in [0, 1] (a batch outside that range is warned
    about once). ``model.neuroguide_info`` holds ``task_name``, ``model_kind``, ``model_config``,
    ``facts`` and ``run_config`` of the checkpoint. ``kind``: refuse a model of another kind.
    ``search``: folders where a part kept by reference that moved is looked up by content (e.g. the
    current ``paths.predictors_dir``).
    """
    ck = read_checkpoint(path, kind)
    model = build_model(ck.model_kind, **ck.model_config)
    missing, unexpected = model.load_state_dict({**ck.state_dict, **referenced_state(ck.references, path, search)},
                                                strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit the {ck.model_kind} model it describes: missing keys "
            f"{missing[:5]}, unexpected keys {unexpected[:5]}")
    model.to(map_location)
    if eval_mode:
        model.eval()
    model.neuroguide_info = ck.info()
    check = _InputRangeCheck(str(path))
    check.handle = model.register_forward_pre_hook(check)
    return model


class _InputRangeCheck:
    """Forward pre-hook: warn when an input batch lies outside [0, 1] (e.g. [0, 255] pixels). It looks
    at the first ``n_checks`` batches only (a min/max costs a device sync) and removes itself after."""

    n_checks = 8

    def __init__(self, name: str):
        self.name, self.seen, self.handle = name, 0, None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return
        self.seen += 1
        if self.seen >= self.n_checks and self.handle is not None:
            self.handle.remove()
        x = args[0].detach()
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            if self.handle is not None:
                self.handle.remove()
            log.warning("model %s takes images in [0, 1] (normalization is inside the model), but got a batch in "
                        "[%.3g, %.3g]%s", self.name, lo, hi, ": divide [0, 255] pixels by 255" if hi > 2 else "")
