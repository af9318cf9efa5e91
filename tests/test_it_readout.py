"""Factorized readout: the formula, its regularizers and constraints, and recovery of a planted teacher."""
from __future__ import annotations

import contextlib

import h5py
import pytest
import torch

from neuroguide.data.it import read_it, split_by_image, split_half_reliability
from neuroguide.metrics import nan_pearson_r
from neuroguide.models.backbones import Backbone
from neuroguide.models.readouts import FactorizedReadout, fit_readout, masked_mse
from neuroguide.models.robust_weights import load_robust_weights


@contextlib.contextmanager
def one_thread():
    """Small dense algebra: one thread is many times faster than two when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def test_readout_matches_the_klindt_formula():
    torch.manual_seed(0)
    ro = FactorizedReadout((5, 3, 4), n_sites=6).eval()  # eval: the centring mean stays 0
    with torch.no_grad():
        ro.bias.normal_()
    x = torch.randn(7, 5, 3, 4)
    # r_n = sum_{c,h,w} features[n, c] * spatial[n, h, w] * F[c, h, w] + b_n, by explicit loops
    ref = torch.zeros(7, 6)
    for b in range(7):
        for n in range(6):
            ref[b, n] = sum(ro.features[n, c] * ro.spatial[n, h, w] * x[b, c, h, w]
                            for c in range(5) for h in range(3) for w in range(4)) + ro.bias[n]
    torch.testing.assert_close(ro(x), ref, rtol=1e-4, atol=1e-5)


def test_centring_is_a_reparametrization_of_the_bias():
    """Training mode centres by the running mean of the batches; the same model with bias
    b_n - sum features * spatial * m and no centring gives the same outputs."""
    torch.manual_seed(3)
    ro = FactorizedReadout((4, 2, 3), n_sites=5)
    a, b = torch.rand(6, 4, 2, 3) + 1, torch.rand(10, 4, 2, 3) + 1
    ro(a)
    ro(b)  # cumulative mean over the two batches
    torch.testing.assert_close(ro.feature_mean, (a.mean(0) + b.mean(0)) / 2)
    ro.eval()
    x = torch.randn(3, 4, 2, 3)
    plain = FactorizedReadout((4, 2, 3), n_sites=5, center=False)
    plain.load_state_dict(ro.state_dict())
    with torch.no_grad():
        plain.bias -= torch.einsum("chw,nhw,nc->n", ro.feature_mean, ro.spatial, ro.features)
    torch.testing.assert_close(ro(x), plain(x))
    before = ro.feature_mean.clone()
    ro(torch.randn(3, 4, 2, 3))
    torch.testing.assert_close(ro.feature_mean, before)  # fixed in eval mode


def test_readout_gradients_match_autograd_numerics():
    torch.manual_seed(1)
    ro = FactorizedReadout((3, 2, 2), n_sites=2).double().eval()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: ro(inp), (x,))


def test_l1_positivity_and_bias_init():
    torch.manual_seed(2)
    ro = FactorizedReadout((4, 2, 3), n_sites=5, positive=True)
    assert (ro.spatial >= 0).all() and (ro.features >= 0).all()
    expected = 0.5 * ro.spatial.abs().sum((1, 2)).mean() + 2.0 * ro.features.abs().sum(1).mean()
    torch.testing.assert_close(ro.l1(spatial=0.5, features=2.0), expected)
    with torch.no_grad():
        ro.spatial.sub_(1.0)
        ro.features.sub_(1.0)
    ro.apply_constraints()
    assert (ro.spatial >= 0).all() and (ro.features >= 0).all() and (ro.spatial == 0).any()
    ro.init_bias(torch.tensor([1.0, 2.0, float("nan"), 4.0, 5.0]))
    torch.testing.assert_close(ro.bias.detach(), torch.tensor([1.0, 2.0, 0.0, 4.0, 5.0]))
    with pytest.raises(ValueError, match="3 mean responses for a readout of 5 sites"):
        ro.init_bias(torch.zeros(3))


def test_readout_rejects_other_feature_maps():
    ro = FactorizedReadout((8, 4, 4), n_sites=3)
    with pytest.raises(ValueError, match=r"expects feature maps \(B, 8, 4, 4\); got \(2, 8, 2, 2\)"):
        ro(torch.zeros(2, 8, 2, 2))


def test_masked_mse_skips_missing_targets():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[2.0, float("nan")], [3.0, 6.0]])
    assert float(masked_mse(pred, target)) == pytest.approx((1 + 0 + 4) / 3)


@pytest.mark.slow  # a CLI run in a subprocess, or a training of ~15 s: the full suite runs it
def test_readout_recovers_the_teacher(tmp_path):
    """On synthetic IT data the teacher's trunk + a fitted readout reaches the noise ceiling;
    a mismatched trunk (same architecture, other random weights) stays clearly below it. The same
    fit without centring the features converges to a worse readout in the same number of steps."""
    from neuroguide.data.synthetic.it import write_synthetic_it

    path = write_synthetic_it(tmp_path, seed=0, n_images=500, n_sites=8, n_repeats=4, image_size=32,
                              teacher_arch="resnet18", teacher_layer="layer2.1")
    rec = read_it(path)
    rows = split_by_image(rec.image_ids, val_fraction=0.0, test_fraction=0.3, seed=0)
    tr, te = rows["train"], rows["test"]
    y = torch.from_numpy(rec.mean_response())
    images = torch.from_numpy(h5py.File(path)["images"][()]).permute(0, 3, 1, 2).float() / 255
    ceiling = torch.from_numpy(split_half_reliability(rec.responses[te])).sqrt()

    teacher = Backbone("resnet18", "layer2.1").eval()
    load_robust_weights(teacher.root, tmp_path / "teacher_resnet18.pt")
    torch.manual_seed(123)
    mismatched = Backbone("resnet18", "layer2.1").eval()
    scores = {}
    with one_thread():
        for name, bb, center in (("teacher", teacher, True), ("mismatched", mismatched, True),
                                 ("teacher, no centring", teacher, False)):
            with torch.no_grad():
                feats = bb(images)
            torch.manual_seed(0)
            ro = FactorizedReadout(feats.shape[1:], rec.n_sites, center=center)
            ro.init_bias(torch.nanmean(y[tr], 0))
            fit_readout(ro, feats[tr], y[tr], steps=600, lr=2e-2, l1_spatial=2.0, l1_features=2.0)
            with torch.no_grad():
                r = nan_pearson_r(ro(feats[te]), y[te])
            scores[name] = (float(r.median()), float((r / ceiling).median()))
    with h5py.File(path) as f:  # the true ceiling: r of the noise-free responses with the measured means
        r_truth = float(nan_pearson_r(torch.from_numpy(f["ground_truth/drive"][()][te]), y[te]).median())
    print(f"median test r (r / sqrt(split-half reliability)): teacher {scores['teacher'][0]:.3f} "
          f"({scores['teacher'][1]:.3f}), mismatched {scores['mismatched'][0]:.3f} ({scores['mismatched'][1]:.3f}); "
          f"teacher without centring {scores['teacher, no centring'][0]:.3f}; "
          f"noise-free teacher {r_truth:.3f}, sqrt reliability {float(ceiling.median()):.3f}")
    assert scores["teacher"][1] > 0.9  # near the noise ceiling
    assert scores["teacher"][0] > 0.9 * r_truth
    assert scores["mismatched"][1] < scores["teacher"][1] - 0.1  # clearly lower
    assert scores["teacher, no centring"][0] < scores["teacher"][0] - 0.03  # why the readout centres
