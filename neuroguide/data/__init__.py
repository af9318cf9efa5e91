"""Data: NSD (fMRI), ImageNet subset / CIFAR-100 (classification), IT recordings, synthetic writers."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping


def prepare_synthetic(data_cfg: Mapping) -> None:
    """Write the embedded synthetic datasets named by the data config when it is synthetic.

    Each writer is idempotent and atomic, so concurrent runs (sweeps, DDP ranks) end with one
    valid tree. Real data configs (``synthetic: false``) are left alone.
    """
    if not data_cfg.get("synthetic"):
        return
    if data_cfg.get("synthetic_nsd") is not None and data_cfg.get("nsd_root"):
        from neuroguide.data.synthetic.nsd import write_synthetic_nsd

        write_synthetic_nsd(Path(data_cfg["nsd_root"]), **dict(data_cfg["synthetic_nsd"]))
    if data_cfg.get("synthetic_imagenet") is not None and data_cfg.get("imagenet_root"):
        from neuroguide.data.synthetic.imagenet import write_synthetic_imagenet

        write_synthetic_imagenet(Path(data_cfg["imagenet_root"]), **dict(data_cfg["synthetic_imagenet"]))
