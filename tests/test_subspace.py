"""Perturbation subspaces (McNeal & Murty): the top-k eigenpairs of J^T J by each method (block Krylov, eigsh,
explicit) against an independent float64 autograd Jacobian + eigh, a linear model with a planted spectrum, each
other, auto's choice, the similarity's two ends (1 for a model with itself, ~k/D for unrelated models), bad input,
and evaluate.py in models= mode."""
from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import evaluate_in
from neuroguide.evaluation.analyses.subspace import core, solvers
from neuroguide.evaluation.analyses.subspace.core import (choose_method, perturbation_subspaces, random_baseline,
                                                          similarity_matrix, subspace_similarity)

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster on the shared CPU
S, K = 8, 20
D = 3 * S * S


def tiny_cnn(seed=0, k_out=K) -> nn.Module:
    """Conv-BN-Softplus-Conv-Linear, 8 px -> k_out outputs; BN with non-trivial running statistics."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Softplus(), nn.Conv2d(6, 4, 3, stride=2),
                        nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, k_out))
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net


def linear_model(W: torch.Tensor) -> nn.Module:
    """r = W x (+ b) on the flattened image: J = W everywhere."""
    lin = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.normal_()
    return nn.Sequential(nn.Flatten(), lin)


def explicit_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(K, D) float64 Jacobian by torch.autograd of a float64 copy of the model in eval mode (independent of the
    module under test)."""
    m = copy.deepcopy(model).double().eval()
    return torch.autograd.functional.jacobian(lambda z: m(z.reshape(1, *x.shape))[0], x.double().reshape(-1))


def explicit_top(model: nn.Module, x: torch.Tensor, k: int) -> tuple[np.ndarray, torch.Tensor]:
    """Independently: the full Jacobian (float64 autograd), J^T J, numpy eigh -> top-k eigenvalues, eigenvectors."""
    J = explicit_jacobian(model, x).numpy()
    w, V = np.linalg.eigh(J.T @ J)
    return w[::-1][:k].copy(), torch.from_numpy(V[:, ::-1][:, :k].copy())


METHODS = ["block", "eigsh", "explicit"]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_equals_the_explicit_jacobian_on_a_conv_net(method):
    model = tiny_cnn().train()  # the analysis must use eval mode (BN running statistics) and restore train mode
    images = torch.rand(3, 3, S, S, generator=torch.Generator().manual_seed(1))
    k = 5
    res = perturbation_subspaces(model, images, k=k, method=method, tol=1e-6, progress=False)
    assert res.method == method and "forced" in res.reason
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert res.eigenvalues.shape == (3, k) and res.eigenvectors.shape == (3, D, k) and res.response_dim == K
    for n in range(3):
        lam, V = explicit_top(model, images[n], k)
        np.testing.assert_allclose(res.eigenvalues[n], lam, rtol=1e-4)
        assert float(subspace_similarity(res.eigenvectors[n], V)) > 0.999
        P = res.eigenvectors[n].double()
        torch.testing.assert_close(P.T @ P, torch.eye(k, dtype=torch.float64), atol=1e-4, rtol=0)  # orthonormal
    assert (np.diff(res.eigenvalues, axis=1) <= 0).all()  # descending
    if method == "explicit":  # K VJPs, no products
        assert (res.n_vjp == K).all() and (res.n_products == 0).all()


def planted_linear_model(spectrum: torch.Tensor, n_out: int, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """r = W x + b with W = U diag(s) V^T, U (n_out, r) and V (D, r) orthonormal (QR of Gaussians): J^T J = V
    diag(s^2) V^T in closed form. Returns the model and V."""
    g = torch.Generator().manual_seed(seed)
    r = len(spectrum)
    U = torch.linalg.qr(torch.randn(n_out, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(D, r, generator=g, dtype=torch.float64))[0]
    return linear_model((U * spectrum.double()) @ V.T), V


@pytest.mark.parametrize("method", METHODS)
def test_linear_model_eigenpairs_are_the_planted_spectrum(method):
    """J^T J = V diag(s^2) V^T exactly (a planted spectrum with one close pair, 0.9 and 0.85): the eigenvalues are s^2
    to 1e-4 and the subspace is V's first k columns, at every image."""
    s = torch.tensor([3.0, 2.0, 1.5, 0.9, 0.85, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01])
    model, V = planted_linear_model(s, n_out=40, seed=2)
    k = 5
    res = perturbation_subspaces(model, torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(3)), k=k,
                                 method=method, tol=1e-6, progress=False)
    for n in range(2):  # J = W at every image
        np.testing.assert_allclose(res.eigenvalues[n], (s[:k] ** 2).numpy(), rtol=1e-4)
        assert float(subspace_similarity(res.eigenvectors[n], V[:, :k])) > 0.9999
    # the (k+1)-th direction is orthogonal to the subspace: similarity with it alone is ~0
    assert float(subspace_similarity(V[:, k:k + 1], res.eigenvectors[0])) < 1e-6


def test_block_residuals_meet_tol_and_the_iterations_are_logged(caplog):
    """The block method stops when every pair's relative residual ||J^T J v - lam v|| / lam <= tol; checked here with
    the independent float64 Jacobian, and the log names the method, the iterations and the residual history."""
    import logging

    model = tiny_cnn(k_out=60)
    x = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(7))
    k, tol = 4, 1e-4
    with caplog.at_level(logging.INFO, logger="neuroguide"):
        res = perturbation_subspaces(model, x, k=k, method="block", tol=tol, progress=False)
    J = explicit_jacobian(model, x[0])
    A = J.T @ J
    V = res.eigenvectors[0].double()
    lam = torch.from_numpy(res.eigenvalues[0])
    rel = (A @ V - V * lam).norm(dim=0) / lam
    assert (rel <= 2 * tol).all(), rel  # (the float32 copy of the eigenvectors adds ~1e-7)
    assert res.iterations[0] >= 2 and res.n_vjp[0] == core.default_block_size(k)  # the start: J^T Omega, b VJPs
    assert "method block (forced by eval.subspace.method=block)" in caplog.text
    assert f"block converged in {res.iterations[0]} iterations ({res.n_products[0]} products" in caplog.text
    assert "largest relative residual per iteration" in caplog.text and "->" in caplog.text


def test_forced_methods_agree_with_each_other():
    """K = 150 outputs of a conv net, k = 6: block, eigsh and explicit give the same eigenvalues (1e-4) and subspaces;
    block and eigsh see the model only through fewer than K vectors (the explicit Jacobian's rows)."""
    model = tiny_cnn(seed=3, k_out=150)
    x = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(8))
    res = {m: perturbation_subspaces(model, x, k=6, method=m, tol=1e-6, progress=False) for m in METHODS}
    for m in ("block", "eigsh"):
        np.testing.assert_allclose(res[m].eigenvalues, res["explicit"].eigenvalues, rtol=1e-4)
        assert float(subspace_similarity(res[m].eigenvectors[0], res["explicit"].eigenvectors[0])) > 0.999
        assert res[m].n_products[0] + res[m].n_vjp[0] < 150, (m, res[m].n_products, res[m].n_vjp)
    assert res["explicit"].n_vjp[0] == 150


def test_products_are_batched_at_most_batch_size(monkeypatch):
    """The block method feeds the model blocks of vectors, at most batch_size per vmapped JVP / VJP call."""
    sizes = {"gram": [], "vjp": []}
    gram, rvjp = core.GramOperator._gram, core.GramOperator._rvjp
    monkeypatch.setattr(core.GramOperator, "_gram", lambda self, T: sizes["gram"].append(T.shape[0]) or gram(self, T))
    monkeypatch.setattr(core.GramOperator, "_rvjp", lambda self, U: sizes["vjp"].append(U.shape[0]) or rvjp(self, U))
    model, _ = planted_linear_model(torch.logspace(0, -2, 30), n_out=30, seed=6)
    res = perturbation_subspaces(model, torch.rand(1, 3, S, S), k=3, method="block", batch_size=4, progress=False)
    assert max(sizes["gram"]) == 4 and max(sizes["vjp"]) == 4, sizes  # batched, capped
    assert sum(sizes["gram"]) == res.n_products[0]


class Shift(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x):
        return x + self.c


def test_block_solves_images_together_as_one_at_a_time(caplog):
    """batch_size // block_size images share the batched calls (each with its own J and basis; images that converge
    leave): the eigenpairs equal those solved one image at a time, and the explicit method's. r = W relu(x - 0.5):
    at the black image 0, J = 0 (done at once, then it leaves the calls); elsewhere J = W on the bright pixels."""
    import logging

    model, _ = planted_linear_model(torch.logspace(0, -1.5, 40), n_out=60, seed=11)
    model = nn.Sequential(Shift(-0.5), nn.ReLU(), model)
    images = torch.rand(4, 3, S, S, generator=torch.Generator().manual_seed(10))
    images[0] = 0.0
    k = 4  # block 8
    with caplog.at_level(logging.INFO, logger="neuroguide"):
        together = perturbation_subspaces(model, images, k=k, method="block", tol=1e-6, batch_size=32,
                                          progress=False)
    assert "4 images per batched call" in caplog.text
    assert together.iterations[0] == 1 and (together.iterations[1:] > 1).all()  # image 0 left the calls
    alone = perturbation_subspaces(model, images, k=k, method="block", tol=1e-6, batch_size=8, progress=False)
    ref = perturbation_subspaces(model, images, k=k, method="explicit", progress=False)
    for res in (together, alone):
        assert (res.eigenvalues[0] == 0).all()
        np.testing.assert_allclose(res.eigenvalues[1:], ref.eigenvalues[1:], rtol=1e-5)
        assert (subspace_similarity(res.eigenvectors[1:], ref.eigenvectors[1:]) > 0.9999).all()


def test_auto_picks_explicit_for_small_k_and_block_for_large_k(caplog):
    """choose_method's documented rule: explicit while K <= 12 x the block size (k + max(4, k // 2)), else block;
    eigsh when batch_size is below half the block; a forced method is kept. And perturbation_subspaces follows it
    and says so in the log."""
    import logging

    b = core.default_block_size(10)
    assert b == 15 and solvers.EXPLICIT_FACTOR == 12
    assert choose_method("auto", 12 * b, 10)[0] == "explicit"
    assert choose_method("auto", 12 * b + 1, 10)[0] == "block"
    assert choose_method("auto", 2000, 10, batch_size=1)[0] == "eigsh"
    assert choose_method("auto", 48, 2, block_size=4)[0] == "explicit"  # 48 <= 12 x 4
    assert choose_method("auto", 49, 2, block_size=4)[0] == "block"
    assert choose_method("auto", 120, 10, block_size=4)[0] == "explicit"  # the block is at least k: 120 <= 12 x 10
    for forced in METHODS:
        assert choose_method(forced, 2000, 10)[0] == forced
    images = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(9))
    with caplog.at_level(logging.INFO, logger="neuroguide"):
        small = perturbation_subspaces(tiny_cnn(k_out=20), images, k=3, progress=False)  # b = 7: 20 <= 84
        large = perturbation_subspaces(tiny_cnn(k_out=100), images, k=3, progress=False)  # 100 > 84
    assert (small.method, large.method) == ("explicit", "block")
    assert "method explicit (auto: K=20 outputs <= 12 x block size 7" in caplog.text
    assert "method block (auto: K=100 outputs > 12 x block size 7" in caplog.text


def test_similarity_is_one_for_a_model_with_itself_and_near_k_over_d_for_unrelated_models():
    images = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(3))
    k = 4
    a1 = perturbation_subspaces(tiny_cnn(0), images, k=k, method="block", seed=0, tol=1e-6, progress=False)
    a2 = perturbation_subspaces(tiny_cnn(0), images, k=k, method="block", seed=123, tol=1e-6,
                                progress=False)  # another random start
    sims = subspace_similarity(a1.eigenvectors, a2.eigenvectors)
    assert sims.shape == (2,) and (sims > 0.999).all()
    # two independent random linear models: their top-k subspaces are independent uniformly random k-subspaces of
    # R^D (a Gaussian W is rotation invariant), so sim ~ the random-subspace distribution, whose mean is k/D and
    # whose sd we measure here by Monte Carlo on QR bases of Gaussian matrices (independent of the module)
    g = torch.Generator().manual_seed(4)
    r1 = perturbation_subspaces(linear_model(torch.randn(30, D, generator=g)), images[:1], k=k, progress=False)
    r2 = perturbation_subspaces(linear_model(torch.randn(30, D, generator=g)), images[:1], k=k, progress=False)
    sim = float(subspace_similarity(r1.eigenvectors[0], r2.eigenvectors[0]))
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(2000):
        P = np.linalg.qr(rng.standard_normal((D, k)))[0]
        Q = np.linalg.qr(rng.standard_normal((D, k)))[0]
        draws.append(np.square(P.T @ Q).sum() / k)
    mc_mean, mc_sd = float(np.mean(draws)), float(np.std(draws))
    assert random_baseline(k, D) == pytest.approx(mc_mean, abs=3 * mc_sd / np.sqrt(2000))  # the baseline is k/D
    assert abs(sim - k / D) < 4 * mc_sd, (sim, k / D, mc_sd)  # within 4 sd of the random distribution
    mean, sd = similarity_matrix({"a": a1, "b": a2})
    assert np.allclose(np.diag(mean), 1.0, atol=1e-5) and mean[0, 1] == pytest.approx(float(sims.mean()))


def test_bad_input_is_named():
    images = torch.rand(1, 3, S, S)
    with pytest.raises(ValueError, match=r"eval.subspace.k=25 exceeds the response dimension K=20.*rank <= K"):
        perturbation_subspaces(tiny_cnn(), images, k=25, progress=False)
    with pytest.raises(ValueError, match=r"eval.subspace.k=192 is not below the input dimension D=192"):
        perturbation_subspaces(linear_model(torch.randn(200, D)), images, k=D, progress=False)
    with pytest.raises(ValueError, match=r"eval.subspace.method=lobpcg was replaced by eval.subspace.method=block"):
        perturbation_subspaces(tiny_cnn(), images, k=2, method="lobpcg", progress=False)
    with pytest.raises(ValueError, match=r"eval.subspace.block_size=0: expected a whole number >= k"):
        perturbation_subspaces(tiny_cnn(), images, k=2, block_size=0, progress=False)
    with pytest.raises(ValueError, match=r"eval.subspace.method='svd' is not known.*auto.*block.*eigsh.*explicit"):
        perturbation_subspaces(tiny_cnn(), images, k=2, method="svd", progress=False)
    with pytest.raises(ValueError, match=r"eval.subspace.k=0: expected a whole number >= 1"):
        perturbation_subspaces(tiny_cnn(), images, k=0, progress=False)
    for method in ("eigsh", "block"):  # a budget too small for the tolerance: reported, not returned half-converged
        with pytest.raises(RuntimeError, match=rf"{method} did not converge.*eval.subspace.max_iter=1"):
            perturbation_subspaces(linear_model(torch.randn(150, D, generator=torch.Generator().manual_seed(5))), images,
                                   k=3, method=method, max_iter=1, tol=1e-10, progress=False)
    classifier = tiny_cnn()
    classifier.neuroguide_info = {"model_kind": "guidance"}  # a guided classifier without a neural head
    with pytest.raises(ValueError, match=r"no region response.*eval.subspace.layer=penultimate"):
        perturbation_subspaces(classifier, images, k=2, progress=False)
    nan_model = tiny_cnn()
    with torch.no_grad():
        nan_model[-1].bias[3] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN/inf values of 20"):
        perturbation_subspaces(nan_model, images, k=2, progress=False)
    with pytest.raises(ValueError, match="different input dimensions D=192 and D=48"):
        subspace_similarity(torch.zeros(D, 2), torch.zeros(48, 2))


# ----------------------------------------------------------------------------- evaluate.py, models= mode
def test_evaluate_models_mode_writes_the_similarity_matrix(guided_ckpts):
    from neuroguide.evaluation.runner import EvaluationFailed

    tmp, (a, b, c) = guided_ckpts
    m, out = evaluate_in(tmp, "e_models", f"models=[{a},{b}]", "eval=[subspace]", "eval.subspace.k=3",
                       "eval.subspace.n_images=1")
    assert m["eval/subspace/random_baseline"] == pytest.approx(3 / (3 * 16 * 16))
    for x in ("a", "b"):
        assert m[f"eval/subspace/{x}/{x}/similarity"] == pytest.approx(1.0, abs=1e-5)
        assert m[f"eval/subspace/{x}/response_dim"] == 8  # the neural head (layer auto)
        assert m[f"eval/subspace/{x}/eigenvalue_1"] >= m[f"eval/subspace/{x}/eigenvalue_3"] > 0
    ab = m["eval/subspace/a/b/similarity"]
    assert 0 <= ab < 1 and ab == pytest.approx(m["eval/subspace/b/a/similarity"], abs=1e-6)  # symmetric
    assert (out / "subspace" / "subspace_similarity.png").stat().st_size > 0
    assert (out / "subspace" / "subspace_spectrum.png").stat().st_size > 0
    rows = list(csv.DictReader(open(out / "subspace" / "subspace_similarity.csv")))
    assert len(rows) == 4 and {r["random_baseline"] for r in rows} == {repr(3 / 768)}
    assert json.loads((out / "metrics.json").read_text()).keys() == m.keys()
    assert m["eval/subspace/a/n_vjp"] == 8 and m["eval/subspace/a/n_products"] == 0  # auto: K=8 -> explicit
    # one model (ckpt= mode), the block method forced by its key: the spectrum, equal to the multi-model run's
    m1, out1 = evaluate_in(tmp, "e_one", f"ckpt={a}", "eval=[subspace]", "eval.subspace.k=3", "eval.subspace.n_images=1",
                           "eval.subspace.method=block")
    assert m1["eval/subspace/eigenvalue_2"] == pytest.approx(m["eval/subspace/a/eigenvalue_2"], rel=1e-4)
    assert m1["eval/subspace/n_products"] > 0 and m1["eval/subspace/iterations"] >= 1
    assert (out1 / "subspace" / "subspace_spectrum.png").exists()
    # models of another input size are refused with the sizes named; k > K names the key
    with pytest.raises(EvaluationFailed, match=r"subspace needs models with one input size.*'a': 16 px.*'c': 24 px"):
        evaluate_in(tmp, "e_sizes", f"models=[{a},{c}]", "eval=[subspace]", "eval.subspace.n_images=1")
    with pytest.raises(EvaluationFailed, match=r"eval.subspace.k=9 exceeds the response dimension K=8"):
        evaluate_in(tmp, "e_k", f"ckpt={a}", "eval=[subspace]", "eval.subspace.k=9", "eval.subspace.n_images=1")


def test_evaluate_sweep_mode_per_run_spectrum_and_sweep_similarity(guided_ckpts):
    """sweep_dir=: each run's spectrum in its eval_metrics.json, the similarity matrix over the runs. (The sweep
    report needs train.py's run folders, which these hand-saved checkpoints are not: its failure is expected.)"""
    import shutil

    from neuroguide.evaluation.runner import EvaluationFailed

    tmp, (a, b, _) = guided_ckpts
    sweep = tmp / "sweep"
    for p in (a, b):
        (sweep / p.parent.name).mkdir(parents=True)
        shutil.copy(p, sweep / p.parent.name / "model.ckpt")
    with pytest.raises(EvaluationFailed) as info:
        evaluate_in(tmp, "e_sweep", f"sweep_dir={sweep}", "eval=[subspace]", "eval.subspace.k=2",
                  "eval.subspace.n_images=1")
    assert list(info.value.failures) == ["eval/report/failed"]
    m = json.loads((tmp / "e_sweep" / "metrics.json").read_text())
    run_a = json.loads((sweep / "a" / "eval_metrics.json").read_text())
    assert run_a["eval/subspace/eigenvalue_1"] == pytest.approx(m["eval/subspace/a/eigenvalue_1"], rel=1e-4)
    assert m["eval/subspace/a/a/similarity"] == pytest.approx(1.0, abs=1e-5) and 0 <= m["eval/subspace/a/b/similarity"] < 1
    assert (tmp / "e_sweep" / "subspace" / "subspace_similarity.png").exists()


@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient_jacobian_warns_that_the_trailing_directions_are_arbitrary(caplog, method):
    """r = W x with rank(W) = 2 and k = 3: the third eigenvalue of J^T J is 0 and its eigenvector any direction of a
    null space, which would lower every similarity at random: the analysis says so."""
    import logging

    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 2, generator=g) @ torch.randn(2, D, generator=g)  # 6 outputs, rank 2
    images = torch.rand(2, 3, S, S, generator=g)
    with caplog.at_level(logging.WARNING, logger="neuroguide"):
        sub = perturbation_subspaces(linear_model(W), images, k=3, method=method, progress=False)
    assert sub.eigenvalues[:, 2].max() <= 1e-8 * sub.eigenvalues[:, 0].min() + 1e-6
    _, sv, _ = np.linalg.svd(W.double().numpy())
    np.testing.assert_allclose(sub.eigenvalues[:, :2], np.tile(sv[:2] ** 2, (2, 1)), rtol=1e-4)  # the rank-2 part
    P = sub.eigenvectors[0].double()
    torch.testing.assert_close(P.T @ P, torch.eye(3, dtype=torch.float64), atol=1e-4, rtol=0)  # still orthonormal
    assert "at 2 of 2 images the k-th eigenvalue" in caplog.text and "rank < k=3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="neuroguide"):
        perturbation_subspaces(linear_model(W), images, k=2, method=method, progress=False)
    assert "rank < k" not in caplog.text
