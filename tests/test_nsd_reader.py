"""NSD reader on a tiny hand-made tree whose answers are known, and on the synthetic writer's tree."""
from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io

from neuroguide.data import nsd, nsd_regions
from neuroguide.data.nsd import Design, NSDPaths, noise_ceiling
from neuroguide.data.nsd_regions import RegionSpec, extract_regions

SHAPE = (2, 2, 1)  # four voxels


def _nii(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def make_tiny_tree(root, betas_by_session, fmt="nii.gz", float_betas=False, masterordering=(1, 2, 1, 3, 2, 1, 3, 3),
                   subject_images=(11, 12, 13), sharedix=(13,), session_numbers=None):
    """Subject 2; 73k ids of its images: subjectim[1] = [11, 12, 13] (1-based) -> 0-based 10, 11, 12.

    Trials (masterordering, 1-based into the subject list) : [1, 2, 1, 3, 2, 1, 3, 3] -> images
    [10, 11, 10, 12, 11, 10, 12, 12]; sharedix = [13] -> image 12 is the test image.
    ``session_numbers``: the NN of each session file (default 1, 2, ...).
    """
    p = NSDPaths(root, 2)
    subjectim = np.zeros((8, len(subject_images)))
    subjectim[1] = subject_images
    scipy.io.savemat(_mk(p.expdesign), {"masterordering": np.array([masterordering], float),
                                        "subjectim": subjectim, "sharedix": np.array([sharedix], float)})
    kastner = np.array([1, 2, 0, -1], np.int16).reshape(SHAPE)  # voxel 0: label 1, voxel 1: label 2
    general = np.array([1, 1, 1, -1], np.int16).reshape(SHAPE)
    _nii(p.roi("Kastner2015"), kastner)
    _nii(p.roi("nsdgeneral"), general)
    _nii(p.ncsnr, np.array([0.5, 1.0, 2.0, 0.0], np.float32).reshape(SHAPE))
    for s, b in zip(session_numbers or range(1, len(betas_by_session) + 1), betas_by_session):  # b: (trials, 4 voxels)
        vol = np.asarray(b, np.float32 if float_betas else np.float64).T.reshape(*SHAPE, len(b))
        if not float_betas:
            vol = np.round(vol * 300).astype(np.int16)
        if fmt == "nii.gz":
            _nii(p.betas_dir / f"betas_session{s:02d}.nii.gz", vol)
        else:
            p.betas_dir.mkdir(parents=True, exist_ok=True)
            with h5py.File(p.betas_dir / f"betas_session{s:02d}.hdf5", "w") as f:
                f["betas"] = vol.transpose(3, 2, 1, 0)
    return p


def _mk(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


SESSIONS = [  # session 1: 5 trials, session 2: 3 trials (trials per session read from the file)
    [[1, 0, 0, 0], [2, 1, 0, 0], [3, 2, 0, 0], [4, 3, 0, 0], [5, 4, 0, 0]],
    [[10, 0, 0, 0], [30, 2, 0, 0], [20, 4, 0, 0]],
]
V1 = RegionSpec("V1", "Kastner2015", (1, 2), "nsdgeneral")


def expected_by_hand():
    """z-score per session and voxel, then average repeats by image."""
    z = []
    for b in SESSIONS:
        b = np.asarray(b, float)[:, :2]
        z.append((b - b.mean(0)) / b.std(0))
    z = np.concatenate(z)
    images = np.array([10, 11, 10, 12, 11, 10, 12, 12])
    return {img: z[images == img].mean(0) for img in (10, 11, 12)}, {10: 3, 11: 2, 12: 3}


@pytest.mark.parametrize("fmt", ["nii.gz", "hdf5"])
def test_tiny_tree_known_answer(tmp_path, fmt):
    make_tiny_tree(tmp_path, SESSIONS, fmt)
    rd = extract_regions(tmp_path, 2, [V1], betas_format=fmt, progress=False)["V1"]
    want, reps = expected_by_hand()
    assert list(rd.train_images) == [10, 11] and list(rd.test_images) == [12]  # shared image = test
    np.testing.assert_allclose(rd.train, np.stack([want[10], want[11]]), atol=2e-3)  # int16 /300 rounding
    np.testing.assert_allclose(rd.test, want[12][None], atol=2e-3)
    assert list(rd.test_repeats) == [reps[12]]
    # noise ceiling: 100 * ncsnr^2 / (ncsnr^2 + 1/n), n = 3 repeats of the test image
    np.testing.assert_allclose(rd.nc, [100 * 0.25 / (0.25 + 1 / 3), 100 * 1 / (1 + 1 / 3)], rtol=1e-5)
    assert rd.meta["trials"] == 8 and rd.meta["sessions"] == 2


def test_trial_to_image_mapping(tmp_path):
    p = make_tiny_tree(tmp_path, SESSIONS)
    d = Design.read(p.expdesign)
    np.testing.assert_array_equal(d.trial_images(2, 8), [10, 11, 10, 12, 11, 10, 12, 12])
    np.testing.assert_array_equal(d.shared_images, [12])


def test_beta_scaling_divides_by_300(tmp_path):
    p = make_tiny_tree(tmp_path, SESSIONS)
    b = nsd.read_session(p.betas_dir / "betas_session01.nii.gz", np.array([0, 1]), SHAPE)
    np.testing.assert_allclose(b, np.asarray(SESSIONS[0], float)[:, :2], atol=1e-6)


def test_noise_ceiling_formula():
    assert noise_ceiling(1.0, 1) == pytest.approx(50.0)
    assert noise_ceiling(0.0, 3) == pytest.approx(0.0)
    np.testing.assert_allclose(noise_ceiling(np.array([2.0]), 3), [100 * 4 / (4 + 1 / 3)])


def test_nan_betas_error_names_file(tmp_path):
    bad = [list(map(float, r)) for r in SESSIONS[0]]
    bad[2][0] = np.nan
    make_tiny_tree(tmp_path, [bad], float_betas=True)
    with pytest.raises(ValueError, match=r"betas_session01\.nii\.gz.*NaN"):
        extract_regions(tmp_path, 2, [V1], progress=False)


def test_missing_files_and_bad_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="paths.nsd_root"):
        extract_regions(tmp_path / "nowhere", 1, [V1], progress=False)
    with pytest.raises(ValueError, match="subject must be an integer 1..8"):
        NSDPaths(tmp_path, 9)
    make_tiny_tree(tmp_path, SESSIONS)
    with pytest.raises(ValueError, match="no voxel.*labels"):
        extract_regions(tmp_path, 2, [RegionSpec("X", "Kastner2015", (16,), None)], progress=False)
    with pytest.raises(KeyError, match="labels"):
        RegionSpec.from_config({"name": "TO", "atlas": "Kastner2015"})
    (NSDPaths(tmp_path, 2).roi("nsdgeneral")).unlink()
    with pytest.raises(FileNotFoundError, match="nsdgeneral.nii.gz"):
        extract_regions(tmp_path, 2, [V1], progress=False)


def test_synthetic_tree_both_formats_agree(synthetic_nsd):
    specs = [RegionSpec("V1", "Kastner2015", (1, 2), "nsdgeneral"), RegionSpec("TO", "Kastner2015", (12, 13), "nsdgeneral"),
             RegionSpec("FFA", "floc-faces", (2, 3), None)]
    a = extract_regions(synthetic_nsd, 1, specs, betas_format="nii.gz", progress=False)
    b = extract_regions(synthetic_nsd, 1, specs, betas_format="hdf5", progress=False)
    for name in ("V1", "TO", "FFA"):
        np.testing.assert_array_equal(a[name].train, b[name].train)
        assert a[name].n_voxels > 10
        assert set(a[name].test_images) <= set(Design.read(NSDPaths(synthetic_nsd, 1).expdesign).shared_images)
    # nsdgeneral intersection drops voxels: V1 is smaller than its Kastner labels alone
    v1_all = extract_regions(synthetic_nsd, 1, [RegionSpec("V1", "Kastner2015", (1, 2), None)], progress=False)["V1"]
    assert v1_all.n_voxels > a["V1"].n_voxels


def test_planted_structure_beats_shuffle(synthetic_nsd):
    """Responses are a function of the image: split-half images agree; a shuffled pairing does not."""
    from neuroguide.metrics import pearson_r
    import torch

    rd = extract_regions(synthetic_nsd, 1, [RegionSpec("TO", "Kastner2015", (12, 13), "nsdgeneral")],
                         progress=False)["TO"]
    assert rd.ncsnr.mean() > 0.5
    # ridge from the writer's pixel features to voxels: held-out r well above a shuffled control
    from neuroguide.data.synthetic.nsd import image_features
    with h5py.File(NSDPaths(synthetic_nsd, 1).stimuli) as f:
        imgs = f["imgBrick"][()]
    X = image_features(imgs)
    X = (X - X.mean(0)) / X.std(0)
    Xtr, Xte = X[rd.train_images], X[rd.test_images]

    def fit_r(ytr):
        W = np.linalg.solve(Xtr.T @ Xtr + 10 * np.eye(X.shape[1]), Xtr.T @ ytr)
        return np.nanmedian(pearson_r(torch.tensor(Xte @ W), torch.tensor(np.asarray(rd.test))).numpy())

    r = fit_r(np.asarray(rd.train))
    r_shuffled = fit_r(np.asarray(rd.train)[np.random.default_rng(0).permutation(len(rd.train))])
    assert r > 0.4 and abs(r_shuffled) < 0.2, (r, r_shuffled)


def test_cache_reused_and_rebuilt_on_param_change(synthetic_nsd, tmp_path, monkeypatch):
    spec = [RegionSpec("V4", "Kastner2015", (7,), "nsdgeneral")]
    first = extract_regions(synthetic_nsd, 1, spec, cache_dir=tmp_path, progress=False)["V4"]
    assert isinstance(first.train, np.memmap)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 1 and not any(p.name.startswith(".") for p in tmp_path.iterdir())

    def no_reads(*a, **k):
        raise AssertionError("a cached region must not read the betas again")

    monkeypatch.setattr(nsd, "read_session", no_reads)
    again = extract_regions(synthetic_nsd, 1, spec, cache_dir=tmp_path, progress=False)["V4"]
    np.testing.assert_array_equal(first.train, again.train)
    monkeypatch.undo()
    pca = extract_regions(synthetic_nsd, 1, spec, cache_dir=tmp_path, pca=True, progress=False)["V4"]
    assert len(list(tmp_path.iterdir())) == 2  # a parameter change makes a new cache entry
    assert pca.pca_components.shape[0] < pca.n_voxels and pca.targets("train").shape[1] == pca.n_outputs


def test_pca_fitted_on_train_only(synthetic_nsd):
    spec = [RegionSpec("V1", "Kastner2015", (1, 2), "nsdgeneral")]
    rd = extract_regions(synthetic_nsd, 1, spec, pca=True, progress=False)["V1"]
    comps, mean = nsd_regions.fit_pca(np.asarray(rd.train), 0.95)
    np.testing.assert_allclose(rd.pca_components, comps, atol=1e-5)
    np.testing.assert_allclose(rd.pca_mean, np.asarray(rd.train).mean(0), atol=1e-5)
    # kept components explain >= 95 % of train variance
    y = np.asarray(rd.train) - mean
    recon = (y @ comps.T) @ comps
    assert 1 - ((y - recon) ** 2).sum() / (y**2).sum() >= 0.95


def test_noise_ceiling_with_mixed_repeat_counts(tmp_path):
    """Test images seen 3, 2 and 1 times: NSD's n has 1/n = mean of 1/n_i (not the mean count)."""
    # subject images (1-based 73k ids 11..16) -> 0-based 10..15; shared: 12, 13, 14 (the test images)
    order = [1, 3, 4, 3, 5, 2, 3, 4, 6, 1]  # images 10 12 13 12 14 11 12 13 15 10
    rng = np.random.default_rng(0)
    sessions = [rng.normal(size=(5, 4)).round(2), rng.normal(size=(5, 4)).round(2)]
    make_tiny_tree(tmp_path, sessions, masterordering=order, subject_images=range(11, 17), sharedix=(13, 14, 15))
    rd = extract_regions(tmp_path, 2, [V1], progress=False)["V1"]
    assert list(rd.test_images) == [12, 13, 14] and list(rd.test_repeats) == [3, 2, 1]
    ncsnr = np.array([0.5, 1.0])  # the tree's ncsnr of the two V1 voxels
    inv_n = (1 / 3 + 1 / 2 + 1 / 1) / 3  # (A/3 + B/2 + C/1) / (A + B + C) with A = B = C = 1
    np.testing.assert_allclose(rd.nc, 100 * ncsnr**2 / (ncsnr**2 + inv_n), rtol=1e-5)
    wrong = 100 * ncsnr**2 / (ncsnr**2 + 1 / 2.0)  # the arithmetic mean count (2) overstates the ceiling
    assert (rd.nc < wrong - 1).all()


def test_noise_ceiling_monte_carlo_matches_formula():
    """Simulated voxels: the ceiling is the variance explained in repeat-averaged responses by the
    signal. With 60/25/15 % of images at 3/2/1 repeats the formula with the harmonic n matches the
    simulation; the arithmetic mean count does not."""
    rng = np.random.default_rng(1)
    n_img, n_vox, snr = 20000, 8, 0.8
    reps = rng.choice([3, 2, 1], size=n_img, p=[0.6, 0.25, 0.15])
    signal = rng.normal(size=(n_img, n_vox)) * snr
    noise_mean = rng.normal(size=(n_img, n_vox)) / np.sqrt(reps)[:, None]  # mean of n_i unit-variance trials
    measured = signal + noise_mean
    simulated = 100 * signal.var(0) / measured.var(0)
    formula = noise_ceiling(np.full(n_vox, snr), nsd.effective_repeats(reps))
    np.testing.assert_allclose(simulated.mean(), formula.mean(), atol=0.6)
    assert abs(noise_ceiling(snr, reps.mean()) - simulated.mean()) > 2


def _copy_without(src, dst, session):
    import shutil

    shutil.copytree(src, dst)
    p = NSDPaths(dst, 1)
    for f in p.betas_dir.glob(f"betas_session{session:02d}.*"):
        f.unlink()
    return p


def test_missing_session_pairs_trials_by_session_number(synthetic_nsd, tmp_path):
    """Without betas_session02 every later trial keeps its image: the responses of images not seen in
    session 2 are exactly those of the full tree, and the repeat counts follow the design."""
    spec = [RegionSpec("TO", "Kastner2015", (12, 13), "nsdgeneral")]
    full = extract_regions(synthetic_nsd, 1, spec, progress=False)["TO"]
    p = _copy_without(synthetic_nsd, tmp_path / "nsd", 2)
    gap = extract_regions(tmp_path / "nsd", 1, spec, progress=False)["TO"]
    assert gap.meta["session_numbers"][:2] == [1, 3]
    # expected trial -> image pairing, computed here from the design and the per-session trial count
    design = Design.read(p.expdesign)
    T = nib.load(str(next(p.betas_dir.glob("betas_session01.nii.gz")))).shape[-1]
    n_sessions = len(list(NSDPaths(synthetic_nsd, 1).betas_dir.glob("betas_session*.nii.gz")))
    trial_images = design.subjectim[0, design.masterordering[:n_sessions * T] - 1] - 1
    in_s2 = np.unique(trial_images[T:2 * T])
    kept = np.concatenate([trial_images[:T], trial_images[2 * T:]])
    for images, resp, gimages, gresp in ((full.train_images, full.train, gap.train_images, gap.train),
                                         (full.test_images, full.test, gap.test_images, gap.test)):
        np.testing.assert_array_equal(gimages, np.unique(kept[np.isin(kept, images)]))
        same = ~np.isin(gimages, in_s2)
        assert same.sum() > 10
        np.testing.assert_allclose(np.asarray(gresp)[same], np.asarray(resp)[np.isin(images, gimages[same])],
                                   atol=1e-5)
    counts = {i: int((kept == i).sum()) for i in gap.test_images}
    assert list(gap.test_repeats) == [counts[i] for i in gap.test_images]


def test_missing_session_with_unequal_sessions_is_an_error(tmp_path):
    """A gap, and sessions of different lengths: the pairing is unknowable, so the error names the
    missing file and the fix."""
    make_tiny_tree(tmp_path, SESSIONS, session_numbers=[1, 3])
    with pytest.raises(ValueError, match=r"betas_session02\.nii\.gz missing.*data\.max_sessions=1"):
        extract_regions(tmp_path, 2, [V1], progress=False)


def test_max_sessions_counts_session_numbers(synthetic_nsd, tmp_path):
    _copy_without(synthetic_nsd, tmp_path / "nsd", 2)
    spec = [RegionSpec("V1", "Kastner2015", (1, 2), "nsdgeneral")]
    rd = extract_regions(tmp_path / "nsd", 1, spec, max_sessions=3, progress=False)["V1"]
    assert rd.meta["session_numbers"] == [1, 3]


# ----------------------------------------------------------------------------- read path and parallel reads
def _reference_read(path, flat_index, volume_shape):
    """The straightforward read: the whole array as nibabel / h5py give it, one voxel at a time."""
    x, y, z = np.unravel_index(flat_index, volume_shape)
    if str(path).endswith(".hdf5"):
        with h5py.File(path, "r") as f:
            data = f["betas"][()]  # (T, Z, Y, X)
        cols = [data[:, k, j, i] for i, j, k in zip(x, y, z)]
    else:
        data = np.asarray(nib.load(str(path)).dataobj)  # (X, Y, Z, T), scaled as nibabel scales
        cols = [data[i, j, k, :] for i, j, k in zip(x, y, z)]
    return np.stack(cols, 1).astype(np.float32) / nsd.BETA_SCALE


def _random_session(tmp_path, fmt, shape=(7, 5, 4, 9), slope=None, inter=None, seed=0):
    rng = np.random.default_rng(seed)
    vol = rng.integers(-32768, 32767, size=shape, dtype=np.int16, endpoint=True)
    path = tmp_path / f"betas_session01.{fmt}"
    if fmt == "hdf5":
        with h5py.File(path, "w") as f:
            f["betas"] = vol.transpose(3, 2, 1, 0)
    else:
        img = nib.Nifti1Image(vol, np.eye(4))
        if slope is not None:
            img.header.set_slope_inter(slope, inter)
        nib.save(img, str(path))
        assert nib.load(str(path)).dataobj.slope == (slope or 1.0)
    return path, shape[:3]


@pytest.fixture(params=["gzip", "isal"])
def gzip_reader(request, monkeypatch):
    """Both .nii.gz decompressors: the standard gzip module, and isal.igzip (optional; skipped when absent)."""
    module = pytest.importorskip("isal.igzip") if request.param == "isal" else __import__("gzip")
    monkeypatch.setattr(nsd, "_gzip", module)
    return request.param


@pytest.mark.parametrize("fmt", ["nii.gz", "hdf5", "nii"])
@pytest.mark.parametrize("block_trials", [None, 2])
def test_read_session_matches_reference_on_random_volume(tmp_path, fmt, gzip_reader, block_trials, monkeypatch):
    """Random int16 over the full range at random voxels (unsorted, one repeated): bit-identical to the
    straightforward read, float32 (trials, voxels); read in one block, or in blocks of 2 trials (9 trials: the last
    block short)."""
    if block_trials:
        monkeypatch.setattr(nsd, "_PIECE_BYTES", block_trials * 7 * 5 * 4 * 2 + 1)
    path, shape = _random_session(tmp_path, fmt)
    rng = np.random.default_rng(1)
    flat = np.concatenate([rng.permutation(np.prod(shape))[:60], [3, 3]])
    got = nsd.read_session(path, flat, shape)
    want = _reference_read(path, flat, shape)
    assert got.dtype == np.float32 and got.shape == (9, len(flat))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("slope, inter", [(2.0, -3.0), (0.5, 0.0)])
def test_read_session_applies_nifti_scaling_like_nibabel(tmp_path, slope, inter, gzip_reader):
    """A header scl_slope / scl_inter: the voxels gathered unscaled, then scaled, equal nibabel's scaled array."""
    path, shape = _random_session(tmp_path, "nii.gz", slope=slope, inter=inter)
    flat = np.arange(0, np.prod(shape), 3)
    np.testing.assert_array_equal(nsd.read_session(path, flat, shape), _reference_read(path, flat, shape))


def test_truncated_session_error_names_file(tmp_path, gzip_reader):
    path, shape = _random_session(tmp_path, "nii.gz", shape=(20, 20, 10, 30))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"betas_session01\.nii\.gz could not be read.*truncated"):
        nsd.read_session(path, np.arange(10), shape)


def test_parallel_read_equals_serial(synthetic_nsd):
    """read_workers=2 (worker processes) gives exactly the arrays of read_workers=1 (this process)."""
    from neuroguide.data.nsd_sessions import read_workers

    specs = [RegionSpec("V1", "Kastner2015", (1, 2), "nsdgeneral"), RegionSpec("FFA", "floc-faces", (2, 3), None)]
    assert read_workers(2, NSDPaths(synthetic_nsd, 1).sessions()) == 2
    serial = extract_regions(synthetic_nsd, 1, specs, progress=False, read_workers=1)
    parallel = extract_regions(synthetic_nsd, 1, specs, progress=True, read_workers=2)
    for name in ("V1", "FFA"):
        for k in ("train_images", "train", "test_images", "test", "test_repeats", "nc"):
            np.testing.assert_array_equal(getattr(serial[name], k), getattr(parallel[name], k))


def test_parallel_read_error_names_file(tmp_path):
    """An error in a worker process reaches the caller with the file's name (NaN betas, then a damaged file)."""
    bad = [list(map(float, r)) for r in SESSIONS[1]]
    bad[1][1] = np.nan
    p = make_tiny_tree(tmp_path, [np.asarray(SESSIONS[0], float), bad], float_betas=True)
    with pytest.raises(ValueError, match=r"betas_session02\.nii\.gz.*NaN"):
        extract_regions(tmp_path, 2, [V1], progress=False, read_workers=2)
    f = p.betas_dir / "betas_session01.nii.gz"
    f.write_bytes(f.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"betas_session01\.nii\.gz could not be read"):
        extract_regions(tmp_path, 2, [V1], progress=False, read_workers=2)


def test_read_workers_bounds(tmp_path, monkeypatch):
    """auto: min(sessions, cores, idle cores, memory / per-session bytes), serial for small sessions; N: at most N;
    a bad value names data.read_workers."""
    from neuroguide.data import nsd_sessions as ns

    sessions = [tmp_path / f"betas_session{i:02d}.nii.gz" for i in range(1, 7)]
    monkeypatch.setattr(ns, "session_nbytes", lambda p: 2**30)
    monkeypatch.setattr(ns, "usable_cores", lambda: 4)
    monkeypatch.setattr(ns, "idle_cores", lambda: 8)
    monkeypatch.setattr(ns, "available_memory", lambda: 100 * 2**30)
    assert ns.read_workers("auto", sessions) == 4  # cores
    assert ns.read_workers("auto", sessions[:2]) == 2  # sessions
    assert ns.read_workers(16, sessions) == 6 and ns.read_workers(1, sessions) == 1
    monkeypatch.setattr(ns, "idle_cores", lambda: 1)
    assert ns.read_workers("auto", sessions) == 1 and ns.read_workers(3, sessions) == 3  # a busy machine
    monkeypatch.setattr(ns, "idle_cores", lambda: 8)
    monkeypatch.setattr(ns, "available_memory", lambda: int(3.5 * 2**30))
    assert ns.read_workers("auto", sessions) == 2  # 3.5 GiB / (1 GiB + overhead)
    assert ns.read_workers(5, sessions) == 2
    monkeypatch.setattr(ns, "session_nbytes", lambda p: 2**20)
    assert ns.read_workers("auto", sessions) == 1  # small sessions: processes cost more than they save
    for bad in (0, "two", 1.5):
        with pytest.raises(ValueError, match="data.read_workers"):
            ns.read_workers(bad, sessions)


def _average_repeats_all_at_once(responses, image_ids):
    """average_repeats as it was before RepeatMeans (all trials in one sparse product), the reference."""
    import scipy.sparse

    images, inverse, counts = np.unique(image_ids, return_inverse=True, return_counts=True)
    avg = scipy.sparse.csr_matrix((1.0 / counts[inverse], (inverse, np.arange(len(image_ids)))),
                                  shape=(len(images), len(image_ids)))
    return images, np.asarray(avg @ responses.astype(np.float64), np.float32), counts


def test_repeat_means_by_blocks_equal_all_at_once(monkeypatch):
    """Sessions folded in one block at a time (repeats within and across blocks, uneven blocks) give the
    all-at-once average bit for bit, and the brute-force per-image mean to float32 precision."""
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.repeat(np.arange(50, 450), rng.integers(1, 4, 400)))
    resp = rng.normal(size=(len(ids), 64)).astype(np.float32)
    want = _average_repeats_all_at_once(resp, ids)
    acc = nsd.RepeatMeans(ids, 64)
    for block in np.split(np.arange(len(ids)), [5, 6, 300, 301, 700]):
        acc.add(resp[block])
    got = acc.result()
    for w, g in zip(want, got):  # bit for bit by scipy's kernel; within float32 rounding by the public product
        assert w.dtype == g.dtype
        assert np.array_equal(w, g) if nsd._csr_matvecs is not None else np.allclose(w, g, rtol=1e-6, atol=0)
    brute = np.stack([resp[ids == i].mean(0) for i in got[0]])
    np.testing.assert_allclose(got[1], brute, rtol=1e-6, atol=1e-6)
    # a scipy without the private kernel: the public sparse product, the same means to float32 precision
    monkeypatch.setattr(nsd, "_csr_matvecs", None)
    acc = nsd.RepeatMeans(ids, 64)
    for block in np.split(np.arange(len(ids)), [5, 6, 300, 301, 700]):
        acc.add(resp[block])
    public = acc.result()
    assert np.array_equal(public[0], got[0]) and np.array_equal(public[2], got[2])
    np.testing.assert_allclose(public[1], got[1], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="more trials than image ids"):
        acc = nsd.RepeatMeans(ids[:3], 64)
        acc.add(resp[:4])


def test_extraction_holds_one_session_at_a_time(synthetic_nsd, monkeypatch):
    """While a session is read, at most one session's voxels read before it are still alive (they are folded into
    the per-image means as they come): flat in the number of sessions. (Before: every session read was kept.)"""
    import weakref

    from neuroguide.data import nsd_sessions

    refs, alive = [], []
    real = nsd_sessions.read_zscored_session

    def tracked(*a):
        alive.append(sum(r() is not None for r in refs))
        out = real(*a)
        refs.append(weakref.ref(out))
        return out

    monkeypatch.setattr(nsd_sessions, "read_zscored_session", tracked)
    got = extract_regions(synthetic_nsd, 1, [V1], progress=False, read_workers=1)["V1"]
    assert len(alive) == len(NSDPaths(synthetic_nsd, 1).sessions()) >= 4
    assert max(alive) <= 1, alive
    monkeypatch.setattr(nsd_sessions, "read_zscored_session", real)
    chunks = nsd_sessions.read_sessions(NSDPaths(synthetic_nsd, 1).sessions(), got.voxel_index,
                                        tuple(got.meta["volume_shape"]), workers=1, progress=False)
    design = Design.read(NSDPaths(synthetic_nsd, 1).expdesign)
    images, means, _ = _average_repeats_all_at_once(np.concatenate(chunks),
                                                    design.trial_images(1, sum(len(c) for c in chunks)))
    train = ~np.isin(images, design.shared_images)
    assert np.array_equal(got.train_images, images[train])
    if nsd._csr_matvecs is not None:  # scipy's kernel: bit for bit; the public product: within float32 rounding
        assert np.array_equal(got.train, means[train])
    else:  # pragma: no cover
        np.testing.assert_allclose(got.train, means[train], rtol=1e-6, atol=1e-7)


def test_stimuli_items_equal_reference_and_open_the_dataset_once(tmp_path, monkeypatch):
    """NSDStimuli items are the reference read (row -> (3, S, S) float / 255 -> antialiased bilinear resize, clamp)
    exactly, resized or not; the dataset is looked up once per worker, not per item; pickling drops the handles."""
    import pickle

    import torch
    import torch.nn.functional as F

    from neuroguide.data.nsd_stimuli import NSDStimuli

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    path = tmp_path / "nsd_stimuli.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=images, chunks=(1, 40, 40, 3))
    lookups = []
    real = h5py.Group.__getitem__
    monkeypatch.setattr(h5py.Group, "__getitem__", lambda self, k: (lookups.append(k), real(self, k))[1])
    for size in (40, 24):
        st = NSDStimuli(path, np.array([4, 0, 5, 2]), size)
        lookups.clear()
        for i, row in enumerate(st.ids):
            want = torch.from_numpy(images[row]).permute(2, 0, 1).float() / 255.0
            if size != 40:
                want = F.interpolate(want[None], size=(size, size), mode="bilinear", antialias=True,
                                     align_corners=False)[0].clamp_(0, 1)
            assert torch.equal(st[i], want)
        assert lookups == ["imgBrick"]
        st2 = pickle.loads(pickle.dumps(st))
        assert st2._f is None and st2._d is None and torch.equal(st2[1], st[1])


def test_read_session_holds_one_block_not_the_session(tmp_path, monkeypatch):
    """A .nii.gz session is decompressed a block of trials at a time: the peak allocation while reading 40 voxels
    of a 3.2 MB session is a small fraction of it (before: the whole session was decompressed into one buffer)."""
    import tracemalloc

    path, shape = _random_session(tmp_path, "nii.gz", shape=(40, 40, 10, 100))
    if hasattr(nsd, "_PIECE_BYTES"):
        monkeypatch.setattr(nsd, "_PIECE_BYTES", 256 * 2**10)
    flat = np.arange(0, np.prod(shape), 400)
    tracemalloc.start()
    got = nsd.read_session(path, flat, shape)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(got, _reference_read(path, flat, shape))
    assert peak < 0.25 * np.prod(shape) * 100 * 2, peak  # a quarter of the 3.2 MB of int16 betas
