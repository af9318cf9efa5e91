"""Checkpoints: the one safe loader, the one way to build a model from a checkpoint.

A neuroguide checkpoint (Lightning's ``.ckpt`` or the exported model file) holds
``hyper_parameters = {"task_name", "model_config", "run_config"}``: ``model_config`` is
everything :meth:`Task.build_model` needs, so :func:`load_model` rebuilds the network without
Hydra or the data. Every file is read with ``torch.load(..., weights_only=True)``: a file holding
a pickled callable is refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroguide.utils.io import atomic_path

FORMAT = "neuroguide-model-v1"


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (check the path, or train the model first)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError, ...
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "Weights only load failed" in str(e):
            raise ValueError(
                f"refusing to load {path}: it holds Python objects (such as a pickled callable) that a "
                f"weights-only load does not allow. Re-save it as a plain state dict "
                f"(torch.save(model.state_dict(), path)). Loader said: {str(e).splitlines()[0]}"
            ) from None
        raise ValueError(f"could not read checkpoint {path}: {e}") from e


def save_model_file(path: str | os.PathLike, task_name: str, model_config: dict, state_dict: dict,
                    run_config: dict | None = None, metrics: dict | None = None) -> Path:
    """Write an exported model (weights + the config to rebuild it), atomically."""
    obj = {
        "format": FORMAT,
        "hyper_parameters": {"task_name": task_name, "model_config": model_config, "run_config": run_config or {}},
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "metrics": dict(metrics or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> tuple[str, dict, dict, dict]:
    """(task_name, model_config, run_config, model state dict) of a neuroguide checkpoint."""
    ckpt = safe_torch_load(path)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hp or "task_name" not in hp or "model_config" not in hp:
        raise ValueError(
            f"{path} is not a neuroguide checkpoint (no hyper_parameters.task_name/model_config). "
            "Use a .ckpt written by `python train.py` or neuroguide.models.checkpoints.save_model_file"
        )
    sd = ckpt["state_dict"]
    if ckpt.get("format") != FORMAT:  # Lightning checkpoint: the task's weights live under "model."
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return hp["task_name"], dict(hp["model_config"]), dict(hp.get("run_config") or {}), sd


def load_model(path: str | os.PathLike, map_location: Any = "cpu", eval_mode: bool = True) -> nn.Module:
    """Rebuild the model stored in ``path`` (no Hydra needed), with its weights, in eval mode.

    The returned module takes images (B, 3, H, W) in [0, 1]. ``model.neuroguide_info`` holds
    ``task_name``, ``model_config`` and ``run_config`` of the checkpoint.
    """
    from neuroguide.tasks import get_task

    task_name, model_config, run_config, sd = read_checkpoint(path)
    model = get_task(task_name).build_model(**model_config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit the {task_name} model it describes: missing keys "
            f"{missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    model.to(map_location)
    if eval_mode:
        model.eval()
    model.neuroguide_info = {"task_name": task_name, "model_config": model_config, "run_config": run_config,
                             "path": str(path)}
    return model
