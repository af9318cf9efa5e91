"""benchmarks/nsd_scale.py's tree at tiny dimensions: the real layout the reader reads, the regions' voxels where the
atlases put them, the imgBrick with only the subject's images written, and extract_regions equal to a direct nibabel
read (z-scored per session and voxel, repeats averaged by hand)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from neuroguide.data.nsd import Design, NSDPaths
from neuroguide.data.nsd_regions import RegionSpec, extract_regions, load_region

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "nsd_scale.py"
TINY = dict(volume=(24, 28, 24), sessions=2, trials=30, total_sessions=40, n_stimuli=3000, image_size=16,
            subject_images=400, shared=40, nsdgeneral=700)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("nsd_scale", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tree(bench, tmp_path_factory):
    return bench.write_tree(tmp_path_factory.mktemp("scale") / "nsd", TINY, link_sessions=3, workers=1)


def _by_hand(root: Path, spec: RegionSpec, sessions: int):
    """Per image: mean over its trials of the betas / 300, z-scored per session and voxel (nibabel's full load)."""
    p = NSDPaths(root, 1)
    mask = spec.mask(p, {})
    z = []
    for f in p.sessions()[:sessions]:
        b = np.asarray(nib.load(str(f)).dataobj)[mask].T / 300.0  # (trials, voxels)
        z.append((b - b.mean(0)) / b.std(0))
    z = np.concatenate(z)
    ids = Design.read(p.expdesign).trial_images(1, len(z))
    return {int(i): z[ids == i].mean(0) for i in np.unique(ids)}


def test_tree_layout_and_extraction_equal_direct_read(bench, tree):
    p = NSDPaths(tree, 1)
    assert [f.name for f in p.sessions()] == [f"betas_session{i:02d}.nii.gz" for i in (1, 2, 3)]
    assert p.sessions()[2].is_symlink() and p.sessions()[2].resolve() == p.sessions()[0].resolve()
    img = nib.load(str(p.sessions()[0]))
    assert img.shape == (*TINY["volume"], TINY["trials"]) and img.get_data_dtype() == np.int16
    assert (np.asarray(nib.load(str(p.roi("nsdgeneral"))).dataobj) > 0).sum() == TINY["nsdgeneral"]
    regions = {r: RegionSpec.from_config(load_region(r)) for r in bench.REGIONS}
    out = extract_regions(tree, 1, list(regions.values()), max_sessions=2, read_workers=1, progress=False)
    for name in ("V1", "FFA"):  # one intersected with nsdgeneral, one not
        rd, want = out[name], _by_hand(tree, regions[name], 2)
        assert rd.n_voxels == regions[name].mask(p, {}).sum() > 0
        got = dict(zip(rd.train_images, rd.train)) | dict(zip(rd.test_images, rd.test))
        assert sorted(got) == sorted(want)
        for i, v in want.items():
            np.testing.assert_allclose(got[i], v, rtol=1e-5, atol=1e-5)
    assert all(out[r].n_voxels > 0 for r in bench.REGIONS)


def test_imgbrick_only_subject_images_written(tree):
    p = NSDPaths(tree, 1)
    ids = Design.read(p.expdesign).subjectim[0] - 1
    with h5py.File(p.stimuli, "r") as f:
        d = f["imgBrick"]
        S = TINY["image_size"]
        assert d.shape == (TINY["n_stimuli"], S, S, 3) and d.dtype == np.uint8 and d.chunks == (1, S, S, 3)
        assert d.id.get_num_chunks() == len(ids) == TINY["subject_images"]  # the others take no space
        assert d[int(ids[0])].any() and not d[int(np.setdiff1d(np.arange(len(d)), ids)[0])].any()
