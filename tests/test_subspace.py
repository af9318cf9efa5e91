"""Perturbation subspaces (McNeal & Murty): matrix-free top-k eigenpairs of J^T J against the explicit Jacobian,
a linear model's SVD, the similarity's two ends (1 for a model with itself, ~k/D for unrelated models), bad
input, and evaluate.py in models= mode."""
from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import evaluate_in
from neuroguide.evaluation.analyses.subspace.core import (perturbation_subspaces, random_baseline, similarity_matrix,
                                            subspace_similarity)

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


def explicit_top(model: nn.Module, x: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Independently: the full Jacobian (autograd, float64 copy of the model in eval mode), J^T J, eigh."""
    m = copy.deepcopy(model).double().eval()
    J = torch.autograd.functional.jacobian(lambda z: m(z.reshape(1, *x.shape))[0], x.double().reshape(-1))
    w, V = torch.linalg.eigh(J.T @ J)
    return w.flip(0)[:k].numpy(), V.flip(1)[:, :k]


@pytest.mark.parametrize("method", ["eigsh", "lobpcg"])
def test_matrix_free_equals_explicit_jacobian(method):
    model = tiny_cnn().train()  # the analysis must use eval mode (BN running statistics) and restore train mode
    images = torch.rand(3, 3, S, S, generator=torch.Generator().manual_seed(1))
    k = 5
    res = perturbation_subspaces(model, images, k=k, method=method, tol=1e-6 if method == "lobpcg" else 1e-8,
                                 progress=False)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert res.eigenvalues.shape == (3, k) and res.eigenvectors.shape == (3, D, k) and res.response_dim == K
    for n in range(3):
        lam, V = explicit_top(model, images[n], k)
        np.testing.assert_allclose(res.eigenvalues[n], lam, rtol=1e-4)
        assert float(subspace_similarity(res.eigenvectors[n], V)) > 0.999
        P = res.eigenvectors[n].double()
        torch.testing.assert_close(P.T @ P, torch.eye(k, dtype=torch.float64), atol=1e-4, rtol=0)  # orthonormal
    assert (np.diff(res.eigenvalues, axis=1) <= 0).all()  # descending


def test_linear_model_subspace_is_the_top_right_singular_vectors():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(12, D, generator=g)
    model = linear_model(W)
    k = 4
    res = perturbation_subspaces(model, torch.rand(2, 3, S, S, generator=g), k=k, tol=1e-8, progress=False)
    _, s, Vt = np.linalg.svd(W.double().numpy())
    top = torch.from_numpy(Vt[:k].T.copy())
    for n in range(2):  # J = W at every image
        np.testing.assert_allclose(res.eigenvalues[n], s[:k] ** 2, rtol=1e-4)
        assert float(subspace_similarity(res.eigenvectors[n], top)) > 0.9999
    # the (k+1)-th singular vector is orthogonal to the subspace: similarity with it alone is ~0
    assert float(subspace_similarity(torch.from_numpy(Vt[k:k + 1].T.copy()), res.eigenvectors[0])) < 1e-6


@pytest.mark.parametrize("method", ["eigsh", "lobpcg"])
def test_the_jacobian_is_never_formed(method):
    """K = 150 outputs: the explicit Jacobian needs 150 VJPs (or a forward pass of 150 tangents); the solvers
    see the model only through products, in batches of at most batch_size images. ARPACK needs fewer than K
    products; torch.lobpcg needs more (each iteration multiplies the whole block [X, W, P] again)."""
    g = torch.Generator().manual_seed(6)
    W = torch.randn(150, D, generator=g) * torch.logspace(0, -2, 150)[:, None]  # a decaying spectrum
    model = linear_model(W)
    batches = []
    model.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    res = perturbation_subspaces(model, torch.rand(1, 3, S, S, generator=g), k=3, method=method, batch_size=4,
                                 progress=False)
    assert max(batches) <= 4, batches
    if method == "eigsh":
        assert res.n_products[0] < 150, res.n_products
    _, s, _ = np.linalg.svd(W.double().numpy())
    np.testing.assert_allclose(res.eigenvalues[0], s[:3] ** 2, rtol=1e-4)


def test_similarity_is_one_for_a_model_with_itself_and_near_k_over_d_for_unrelated_models():
    images = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(3))
    k = 4
    a1 = perturbation_subspaces(tiny_cnn(0), images, k=k, seed=0, tol=1e-8, progress=False)
    a2 = perturbation_subspaces(tiny_cnn(0), images, k=k, seed=123, tol=1e-8, progress=False)  # other random start
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
    with pytest.raises(ValueError, match=r"LOBPCG needs 3 k <= D=192"):
        perturbation_subspaces(linear_model(torch.randn(200, D)), images, k=70, method="lobpcg", progress=False)
    with pytest.raises(ValueError, match=r"eval.subspace.method='svd' is not known.*eigsh"):
        perturbation_subspaces(tiny_cnn(), images, k=2, method="svd", progress=False)
    with pytest.raises(ValueError, match=r"eval.subspace.k=0: expected a whole number >= 1"):
        perturbation_subspaces(tiny_cnn(), images, k=0, progress=False)
    for method in ("eigsh", "lobpcg"):  # a budget too small for the tolerance: reported, not returned half-converged
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
    # one model (ckpt= mode): the spectrum, equal to the multi-model run's
    m1, out1 = evaluate_in(tmp, "e_one", f"ckpt={a}", "eval=[subspace]", "eval.subspace.k=3", "eval.subspace.n_images=1")
    assert m1["eval/subspace/eigenvalue_2"] == pytest.approx(m["eval/subspace/a/eigenvalue_2"], rel=1e-4)
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


def test_rank_deficient_jacobian_warns_that_the_trailing_directions_are_arbitrary(caplog):
    """r = W x with rank(W) = 2 and k = 3: the third eigenvalue of J^T J is 0 and its eigenvector any direction of a
    null space, which would lower every similarity at random: the analysis says so."""
    import logging

    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 2, generator=g) @ torch.randn(2, D, generator=g)  # 6 outputs, rank 2
    images = torch.rand(2, 3, S, S, generator=g)
    with caplog.at_level(logging.WARNING, logger="neuroguide"):
        sub = perturbation_subspaces(linear_model(W), images, k=3, progress=False)
    assert sub.eigenvalues[:, 2].max() <= 1e-8 * sub.eigenvalues[:, 0].min() + 1e-6
    assert "at 2 of 2 images the k-th eigenvalue" in caplog.text and "rank < k=3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="neuroguide"):
        perturbation_subspaces(linear_model(W), images, k=2, progress=False)
    assert "rank < k" not in caplog.text
