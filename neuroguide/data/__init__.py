"""Data: NSD (fMRI), ImageNet subset / CIFAR-100 (classification), IT recordings, synthetic writers."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def prepare_synthetic(data_cfg: Mapping, needs: Sequence[str] = ("nsd", "imagenet")) -> None:
    """Write the embedded synthetic datasets a task ``needs`` (nsd, imagenet, it) when data is synthetic.

    Each writer is idempotent and atomic, so concurrent runs (sweeps, DDP ranks) end with one
    valid tree. Real data configs (``synthetic: false``) are left alone.
    """
    if not data_cfg.get("synthetic"):
        return
    if "nsd" in needs and data_cfg.get("synthetic_nsd") is not None:
        from neuroguide.data.synthetic.nsd import write_synthetic_nsd

        write_synthetic_nsd(Path(data_cfg["nsd_root"]), **dict(data_cfg["synthetic_nsd"]))
    if "imagenet" in needs and data_cfg.get("synthetic_imagenet") is not None:
        from neuroguide.data.synthetic.imagenet import write_synthetic_imagenet

        write_synthetic_imagenet(Path(data_cfg["imagenet_root"]), **dict(data_cfg["synthetic_imagenet"]))
    if "it" in needs and data_cfg.get("synthetic_it") is not None:
        from neuroguide.data.synthetic.it import write_synthetic_it

        want = Path(data_cfg["synthetic_it_file"])
        written = write_synthetic_it(want.parent, **dict(data_cfg["synthetic_it"]))
        if written != want:
            raise ValueError(f"data.synthetic_it_file={want}: the synthetic IT writer names its file {written.name}; "
                             f"set data.synthetic_it_file={written}")
