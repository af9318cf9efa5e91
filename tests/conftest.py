"""Shared fixtures: W&B off, small synthetic NSD and ImageNet trees written by the real writers."""
from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402

SMALL_NSD = dict(n_stimuli=240, n_subject_images=200, n_shared=40, n_repeats=3, trials_per_session=150,
                 image_size=32, seed=0)


@pytest.fixture(scope="session")
def synthetic_nsd(tmp_path_factory):
    from neuroguide.data.synthetic.nsd import write_synthetic_nsd

    return write_synthetic_nsd(tmp_path_factory.mktemp("nsd") / "nsd", **SMALL_NSD)
