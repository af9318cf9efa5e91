"""RSA against rsatoolbox (RDMs and comparisons), against the project's Pearson r, planted and
shuffled controls, MDS against known geometry, and bad input."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

from neuroguide.evaluation.metrics import ranks as ranks_mod
from neuroguide.evaluation.metrics import rdm as rdm_mod
from neuroguide.evaluation.analyses.rsa import core as rsa
from neuroguide.metrics import pearson_r

rsatoolbox = pytest.importorskip("rsatoolbox")
from rsatoolbox.data import Dataset  # noqa: E402
from rsatoolbox.rdm import RDMs, calc_rdm  # noqa: E402
from rsatoolbox.rdm import compare as rsa_compare  # noqa: E402


def patterns(n=40, k=12, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((n, 3))
    a = shared @ rng.standard_normal((3, k)) + rng.standard_normal((n, k))
    b = shared @ rng.standard_normal((3, k)) + noise * rng.standard_normal((n, k))
    return a, b


@pytest.mark.parametrize("method", ["correlation", "euclidean"])
def test_rdm_equals_rsatoolbox(method):
    a, _ = patterns(n=41, k=9)
    ours = rsa.rdm(torch.from_numpy(a), method, chunk_size=6)  # several chunks, a ragged last one
    theirs = calc_rdm(Dataset(a), method=method).get_vectors()[0]
    assert ours.shape == theirs.shape == (41 * 40 // 2,)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-6, rtol=0)
    # chunking does not change the result
    np.testing.assert_allclose(rsa.rdm(torch.from_numpy(a), method, chunk_size=1000).numpy(), ours.numpy(), atol=1e-12)


def test_rdm_scaling_documented():
    """Our 'euclidean' is rsatoolbox's: squared distance / K; sqrt(K d) is the Euclidean distance."""
    a, _ = patterns(n=10, k=7)
    d = rsa.squareform(rsa.rdm(torch.from_numpy(a), "euclidean")).numpy()
    direct = np.linalg.norm(a[:, None] - a[None], axis=-1)
    np.testing.assert_allclose(np.sqrt(7 * d.clip(min=0)), direct, atol=1e-8)


def test_correlation_rdm_is_one_minus_project_pearson():
    a, _ = patterns(n=8, k=30)
    sq = rsa.squareform(rsa.rdm(torch.from_numpy(a)))
    t = torch.from_numpy(a).T  # columns = stimuli
    for i, j in [(0, 1), (2, 7), (5, 3)]:
        r = float(pearson_r(t[:, i], t[:, j]))
        assert abs(float(sq[i, j]) - (1 - r)) < 1e-6


@pytest.mark.parametrize("method", ["correlation", "euclidean"])
@pytest.mark.parametrize("comparison", ["spearman", "tau-a", "cosine"])
def test_compare_equals_rsatoolbox(method, comparison):
    a, b = patterns(n=35, k=10, seed=3)
    ra, rb = calc_rdm(Dataset(a), method=method), calc_rdm(Dataset(b), method=method)
    ours = rsa.compare(rsa.rdm(torch.from_numpy(a), method), rsa.rdm(torch.from_numpy(b), method), comparison)
    theirs = float(rsa_compare(ra, rb, method=comparison)[0, 0])
    assert abs(ours - theirs) < 1e-12
    assert abs(ours) > 0.05  # related patterns: a similarity that could be wrong


@pytest.mark.parametrize("comparison", ["spearman", "tau-a", "cosine"])
def test_compare_with_ties_equals_rsatoolbox(comparison):
    rng = np.random.default_rng(1)
    m = 20 * 19 // 2
    x = rng.integers(0, 6, m).astype(float)  # many ties in both vectors, and joint ties
    y = (x + rng.integers(0, 4, m)).astype(float)
    theirs = float(rsa_compare(RDMs(x[None]), RDMs(y[None]), method=comparison)[0, 0])
    assert abs(rsa.compare(torch.from_numpy(x), torch.from_numpy(y), comparison) - theirs) < 1e-12


def brute_force_discordant(x, y):
    """O(n^2) count of pairs ordered oppositely by x and y (pairs tied in either are not counted)."""
    dx = np.sign(x[None, :] - x[:, None])
    dy = np.sign(y[None, :] - y[:, None])
    return int(np.triu(dx * dy < 0, 1).sum())


@pytest.mark.parametrize("seed,levels", [(0, 3), (1, 6), (2, 40), (3, 10_000), (4, None)])
def test_discordant_pairs_equal_brute_force(seed, levels):
    """The numpy discordant count equals the O(n^2) count, with many, few or no ties (levels=None: continuous),
    whichever vector is the first."""
    rng = np.random.default_rng(seed)
    m = 30 * 29 // 2
    x = rng.integers(0, levels, m).astype(float) if levels else rng.standard_normal(m)
    y = np.where(rng.random(m) < 0.5, x, rng.integers(0, levels, m) if levels else rng.standard_normal(m))
    a, b = rdm_mod.prepare(torch.from_numpy(x)), rdm_mod.prepare(torch.from_numpy(y))
    expected = brute_force_discordant(x, y)
    assert expected > 0
    assert ranks_mod.discordant_pairs(a.info, b.info) == expected
    assert ranks_mod.discordant_pairs(b.info, a.info) == expected
    const = rdm_mod.prepare(torch.ones(m, dtype=torch.float64))
    assert ranks_mod.discordant_pairs(const.info, b.info) == 0


def brute_force_inversions(p):
    return int(np.triu(p[:, None] > p[None, :], 1).sum())


@pytest.mark.parametrize("n", [0, 1, 2, 3, 31, 32, 33, 100, 255, 256, 257, 1000])
def test_inversions_equal_brute_force(n):
    """Sizes around the padding to 2^B, the direct-comparison rows (32) and the 8-bit switch (256)."""
    rng = np.random.default_rng(n)
    p = rng.permutation(n)
    assert ranks_mod.inversions(p) == brute_force_inversions(p)
    assert ranks_mod.inversions(np.arange(n)) == 0
    assert ranks_mod.inversions(np.arange(n)[::-1]) == n * (n - 1) // 2
    near = np.argsort(np.arange(n) + 3 * rng.standard_normal(n))  # nearly sorted, as for related RDMs
    assert ranks_mod.inversions(near) == brute_force_inversions(near)


@pytest.mark.parametrize("kind", ["normal", "levels", "close", "signed_zeros", "exponents"])
def test_sort_order_and_ties_equal_numpy(kind):
    """The packed-key sort is an exact argsort with exact tie flags, also where values agree in their top ~40
    bits (``close``: spread 1e-12 around 1, so most keys collide and are reordered by the full values),
    for -0.0 == 0.0, and across the whole float range."""
    rng = np.random.default_rng(len(kind))
    m = 5000
    v = {"normal": lambda: rng.standard_normal(m),
         "levels": lambda: rng.integers(0, 7, m).astype(float),
         "close": lambda: 1 + 1e-12 * rng.integers(-500, 500, m),
         "signed_zeros": lambda: np.where(rng.random(m) < 0.5, -0.0, 0.0) + rng.integers(-2, 2, m),
         "exponents": lambda: rng.standard_normal(m) * 10.0 ** rng.integers(-300, 300, m)}[kind]()
    order, new = ranks_mod.sort_order(v)
    assert np.array_equal(np.sort(order), np.arange(m))  # a permutation
    sv = np.sort(v)
    assert np.array_equal(v[order], sv)
    assert np.array_equal(new, np.r_[True, sv[1:] != sv[:-1]])
    info = ranks_mod.rank_info(v)
    from scipy.stats import rankdata

    np.testing.assert_array_equal(info.dense, rankdata(v, method="dense") - 1)
    np.testing.assert_array_equal(info.average_ranks(), rankdata(v))


@pytest.mark.parametrize("n", [70_000, 2 ** 17])
def test_inversions_of_long_permutations_equal_scipy(n):
    """Past the 16-bit switch (2^16): against scipy.stats.kendalltau of (0..n-1, p), whose tau-a = tau-b
    (no ties) = 1 - 4 inversions / (n (n - 1)); its float error is far below one inversion here."""
    from scipy.stats import kendalltau

    p = np.random.default_rng(n).permutation(n)
    tau = kendalltau(np.arange(n), p).statistic
    assert ranks_mod.inversions(p) == round((1 - tau) * n * (n - 1) / 4)
    assert ranks_mod.inversions(p[::-1]) == n * (n - 1) // 2 - ranks_mod.inversions(p)


@pytest.mark.parametrize("ties", [False, True])
def test_long_rdms_equal_rsatoolbox_and_scipy(ties):
    """420 stimuli (87,990 pairs: every bit width of the count), all three comparisons against rsatoolbox to
    1e-12; Spearman against scipy.stats.spearmanr, and tau-a against scipy's tau-b where there are no ties."""
    from scipy.stats import kendalltau, spearmanr

    a, b = patterns(n=420, k=16, seed=9, noise=2.0)
    va, vb = rsa.rdm(torch.from_numpy(a)).numpy(), rsa.rdm(torch.from_numpy(b)).numpy()
    if ties:  # a model predicting 12 levels of dissimilarity: many ties, and ties in both
        va = np.digitize(va, np.quantile(va, np.linspace(0, 1, 13)[1:-1])).astype(float)
    ours = rsa.compare_all({"a": torch.from_numpy(va), "b": torch.from_numpy(vb)})
    rdms = RDMs(np.stack([va, vb]))
    for c in rsa.COMPARISONS:
        np.testing.assert_allclose(ours[c], rsa_compare(rdms, rdms, method=c), atol=1e-12, rtol=0)
    assert abs(ours["spearman"][0, 1] - spearmanr(va, vb).statistic) < 1e-12
    if not ties:
        assert abs(ours["tau-a"][0, 1] - kendalltau(va, vb).statistic) < 1e-12
    assert 0.05 < ours["tau-a"][0, 1] < 0.95


def test_no_private_scipy_import():
    import inspect

    for mod in (rdm_mod, rsa):
        assert "scipy.stats._" not in inspect.getsource(mod)


def test_spearman_is_project_pearson_of_ranks():
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.integers(0, 9, 300).astype(float))
    y = x + torch.from_numpy(rng.standard_normal(300))
    a, b = rsa.prepare(x), rsa.prepare(y)
    assert abs(rsa.spearman(a, b) - float(pearson_r(a.ranks, b.ranks))) < 1e-6


def test_compare_all_matrix_equals_rsatoolbox():
    rng = np.random.default_rng(5)
    vecs = {f"m{i}": rng.integers(0, 4, 45).astype(float) + (0 if i else 0.1 * rng.standard_normal(45))
            for i in range(3)}
    ours = rsa.compare_all({k: torch.from_numpy(v) for k, v in vecs.items()})
    rdms = RDMs(np.stack(list(vecs.values())))
    for c in rsa.COMPARISONS:
        np.testing.assert_allclose(ours[c], rsa_compare(rdms, rdms, method=c), atol=1e-12, rtol=0)
        np.testing.assert_allclose(ours[c], ours[c].T)


def test_shuffled_control():
    """Same patterns -> spearman 1; stimuli shuffled in one set -> near 0."""
    a, _ = patterns(n=60, k=20, seed=6)
    va = rsa.rdm(torch.from_numpy(a))
    assert rsa.compare(va, rsa.rdm(torch.from_numpy(a * 3 + 1))) == pytest.approx(1.0, abs=1e-9)
    perm = np.random.default_rng(0).permutation(60)
    assert abs(rsa.compare(va, rsa.rdm(torch.from_numpy(a[perm])))) < 0.15


def test_nan_positions_left_out():
    a, b = patterns(n=12, k=6, seed=7)
    a[3] = 1.0  # a constant pattern: its correlation distances are undefined
    va, vb = rsa.rdm(torch.from_numpy(a)), rsa.rdm(torch.from_numpy(b))
    keep = torch.isfinite(va)
    assert int((~keep).sum()) == 11
    for c in rsa.COMPARISONS:
        theirs = float(rsa_compare(RDMs(va[keep].numpy()[None]), RDMs(vb[keep].numpy()[None]), method=c)[0, 0])
        assert abs(rsa.compare(va, vb, c) - theirs) < 1e-12


def test_different_stimulus_sets_refused():
    a, b = patterns(n=10, k=5)
    with pytest.raises(ValueError, match=r"different stimulus sets.*10 stimuli.*8 .*same stimuli"):
        rsa.compare(rsa.rdm(torch.from_numpy(a)), rsa.rdm(torch.from_numpy(b[:8])), names=("model", "V1"))


def test_bad_input_messages():
    with pytest.raises(ValueError, match="RDM method 'cityblock' is not known"):
        rsa.rdm(torch.randn(5, 3), "cityblock")
    with pytest.raises(ValueError, match="not known: expected some of"):
        rsa.compare(torch.rand(10), torch.rand(10), "kendall-b")
    with pytest.raises(ValueError, match="at least 3 stimuli"):
        rsa.rdm(torch.randn(2, 3))
    with pytest.raises(ValueError, match="non-finite"):
        rsa.rdm(torch.tensor([[1.0, float("nan")], [0.0, 1.0], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="not the upper triangle"):
        rsa.prepare(torch.rand(11))


def test_classical_mds_recovers_planted_geometry():
    pts = torch.randn(15, 2, dtype=torch.float64)
    d = torch.cdist(pts, pts)
    xy = rsa.classical_mds(d)
    torch.testing.assert_close(torch.cdist(xy, xy), d, atol=1e-8, rtol=0)
    # on an RDM: sqrt of the euclidean RDM is Euclidean, so pairwise distances are kept (up to scale)
    a = torch.randn(12, 2, dtype=torch.float64)
    xy = rsa.rdm_mds(rsa.rdm(a, "euclidean"))
    torch.testing.assert_close(torch.cdist(xy, xy) * 2 ** 0.5, torch.cdist(a, a), atol=1e-8, rtol=0)


# ----------------------------------------------------------------------------- evaluate
def tiny_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5))


def test_evaluate_planted_region_and_shuffle(tmp_path):
    model = tiny_net(0)
    images = torch.rand(30, 3, 12, 12)
    with torch.no_grad():
        feats = model[:4](images)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    responses = {"V1": feats * 2.0 + 1.0, "shuffled": feats[perm]}
    m = rsa.evaluate(model, images, tmp_path, layers="3", responses=responses, progress=False)
    assert m["eval/rsa/V1/spearman"] == pytest.approx(1.0, abs=1e-9)
    assert m["eval/rsa/V1/tau-a"] == pytest.approx(1.0, abs=1e-9)
    assert abs(m["eval/rsa/shuffled/spearman"]) < 0.3
    rows = list(csv.DictReader(open(tmp_path / "rsa.csv")))
    assert len(rows) == 2 * 3
    assert (tmp_path / "rsa_rdms.png").stat().st_size > 1000
    # several layers: the layer goes into the key
    m2 = rsa.evaluate(model, images, tmp_path / "two", layers=["3", None], responses=responses["V1"],
                      comparisons=["cosine"], progress=False)
    assert set(m2) == {"eval/rsa/region/3/cosine", "eval/rsa/region/output/cosine"}


def test_evaluate_responses_must_match_images(tmp_path):
    with pytest.raises(ValueError, match=r"responses\['V4'\] has 7 stimuli but the images are 9"):
        rsa.evaluate(tiny_net(0), torch.rand(9, 3, 8, 8), tmp_path, responses={"V4": torch.randn(7, 4)}, progress=False)


def test_evaluate_models(tmp_path):
    models = {"a": tiny_net(0), "b": tiny_net(1), "c": tiny_net(0)}
    images = torch.rand(20, 3, 10, 10)
    m = rsa.evaluate_models(models, images, tmp_path, layer="3", responses={"TO": torch.randn(20, 7)}, progress=False)
    assert m["eval/rsa/model_vs_model/a/c/spearman"] == pytest.approx(1.0, abs=1e-9)  # same weights
    assert m["eval/rsa/model_vs_model/a/b/spearman"] < 0.999
    assert "eval/rsa/model_vs_model/b/a/spearman" not in m
    assert {"eval/rsa/TO/a/tau-a", "eval/rsa/TO/b/cosine"} <= set(m)
    for f in ("rsa_model_vs_model.csv", "rsa_model_vs_model.png", "rsa_models_mds.png"):
        assert (tmp_path / f).is_file()


def test_sub_rdm_reads_the_condensed_vector():
    a = torch.randn(9, 4, dtype=torch.float64)
    v = rsa.rdm(a)
    idx = [0, 3, 4, 8]
    torch.testing.assert_close(rsa.sub_rdm(v, idx), rsa.squareform(v)[idx][:, idx])


# ----------------------------------------------------------------------------- figures
@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures written by save_figure, by file name (the PNGs are still written)."""
    from neuroguide.evaluation import plots

    figs, save = {}, plots.save_figure

    def keep(fig, path):
        figs[str(path).rsplit("/", 1)[-1]] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    return figs


def test_rdm_figures_are_readable(tmp_path, saved_figures):
    """6 RDMs (3 layers, 3 regions): a grid of <= 4 columns under ~2000 px, scores in the layer titles,
    one colour bar naming the measure; the MDS coloured by class with a legend."""
    from PIL import Image

    model = tiny_net(0)
    images = torch.rand(24, 3, 12, 12)
    with torch.no_grad():
        feats = model[:4](images)
    responses = {"V1": feats + 0.1 * torch.randn_like(feats), "V4": torch.randn(24, 6), "TO": torch.randn(24, 5)}
    m = rsa.evaluate(model, images, tmp_path, layers=["1", "3", None], responses=responses,
                     labels=torch.arange(24) % 3, progress=False)
    for name in ("rsa_rdms.png", "rsa_mds.png"):
        w, h = Image.open(tmp_path / name).size
        assert w <= 2000, f"{name} is {w} px wide"
        assert h >= 500  # two rows of panels, not one long strip
    fig = saved_figures["rsa_rdms.png"]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 6
    layer3 = next(t for t in titles if t.startswith("model layer 3"))
    assert f"Spearman r vs V1 = {m['eval/rsa/V1/3/spearman']:.3f}" in layer3
    assert any(t.startswith("region TO") for t in titles)
    bars = [ax for ax in fig.axes if "dissimilarity" in ax.get_ylabel()]
    assert len(bars) == 1 and "1 - Pearson r" in bars[0].get_ylabel()
    mds = saved_figures["rsa_mds.png"]
    assert [t.get_text() for t in mds.legends[0].get_texts()] == ["class 0", "class 1", "class 2"]
    assert all(ax.get_xlabel() == "MDS 1" for ax in mds.axes if ax.get_title())
