"""Atomic writers: whole files or nothing, and the permissions a plain write would have."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from neuroguide.utils.io import atomic_dir, atomic_path, write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def _plain_modes(tmp_path):
    """What open() and mkdir() give here, computed by doing them."""
    f, d = tmp_path / "plain_file", tmp_path / "plain_dir"
    f.write_text("x")
    d.mkdir()
    return _mode(f), _mode(d)


def test_atomic_writers_leave_plain_permissions(tmp_path, umask_022, synthetic_nsd):
    from neuroguide.data.nsd_regions import RegionSpec, extract_regions
    from neuroguide.data.synthetic.nsd import write_synthetic_nsd
    from neuroguide.models.checkpoints import save_model_file

    file_mode, dir_mode = _plain_modes(tmp_path)
    assert (file_mode, dir_mode) == (0o644, 0o755)
    with atomic_path(tmp_path / "a.txt") as t:
        t.write_text("a")
    write_json(tmp_path / "m.json", {"a": 1})
    save_model_file(tmp_path / "model.ckpt", "predictor", {"arch": "resnet18", "n_outputs": 2},
                    {"w": torch.zeros(1)}, {}, None)
    with atomic_dir(tmp_path / "folder", complete=lambda p: False) as t:
        (t / "inside.npy").write_bytes(b"0")
    for f in ("a.txt", "m.json", "model.ckpt"):
        assert _mode(tmp_path / f) == file_mode, f
    assert _mode(tmp_path / "folder") == dir_mode
    # the NSD cache and a synthetic tree, as a colleague on the cluster would read them
    extract_regions(synthetic_nsd, 1, [RegionSpec("V4", "Kastner2015", (7,), "nsdgeneral")],
                    cache_dir=tmp_path / "cache", progress=False)
    (entry,) = (tmp_path / "cache").iterdir()
    assert _mode(entry) == dir_mode and {_mode(p) for p in entry.iterdir()} == {file_mode}
    root = write_synthetic_nsd(tmp_path / "nsd", n_stimuli=40, n_subject_images=30, n_shared=6, n_repeats=2,
                               trials_per_session=20, image_size=8, seed=1)
    assert _mode(root) == dir_mode
    assert {_mode(p) for p in root.rglob("*") if p.is_file()} == {file_mode}


def test_atomic_dir_leaves_nothing_on_error_and_keeps_a_complete_concurrent_copy(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d", complete=lambda p: True) as t:
            (t / "half.npy").write_bytes(b"0")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "theirs").write_text("whole")
    with atomic_dir(tmp_path / "d", complete=lambda p: (p / "theirs").exists()) as t:
        (t / "ours").write_text("whole")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # our temporary folder is gone
    with pytest.raises(OSError):  # a non-empty folder that is not a complete copy is never overwritten
        with atomic_dir(tmp_path / "d", complete=lambda p: False) as t:
            (t / "ours").write_text("x")
    assert np.array_equal(sorted(p.name for p in tmp_path.iterdir()), ["d"])


def test_synthetic_imagenet_tree_has_plain_permissions(tmp_path, umask_022):
    from neuroguide.data.synthetic.imagenet import write_synthetic_imagenet

    file_mode, dir_mode = _plain_modes(tmp_path)
    root = write_synthetic_imagenet(tmp_path / "imagenet", n_classes=2, n_train=2, n_val=1, image_size=8, seed=0)
    assert _mode(root) == dir_mode
    assert {_mode(p) for p in root.rglob("*") if p.is_file()} == {file_mode}
