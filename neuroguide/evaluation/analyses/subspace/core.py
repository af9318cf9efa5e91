"""Perturbation subspaces (McNeal & Murty): the image directions a model's response is most sensitive to.

For an image ``x`` (D = 3 S S pixels) and a model's response vector ``r(x)`` (K outputs: the voxels of a
region, IT sites, a guided classifier's neural head; :func:`neuroguide.evaluation.responses.response_function`),
a small perturbation ``d`` changes the response by ``r(x + d) - r(x) ~ J d`` (J = dr/dx, K x D), so

    ||r(x + d) - r(x)||^2 ~ d^T (J^T J) d,

and the directions that change the response most, per unit L2 norm, are the top eigenvectors of ``J^T J``.
The top k of them, stacked as the columns of ``P`` (D x k, orthonormal), are the model's *perturbation
subspace* at ``x``; the eigenvalues are the squared response changes along them (the spectrum).

Three solvers, behind :func:`perturbation_subspaces` (``method``; ``auto`` picks one by :func:`choose_method`):

- ``block`` (block Krylov, :func:`block_krylov_top`): ``J^T J`` is never formed; the model is fed *batches* of
  products ``J^T J V`` (one vmapped JVP of the block, ``J V``, then one vmapped VJP, ``J^T (J V)``, through the
  forward pass kept once per image). The start is ``J^T Omega`` (``Omega``: a random K x b block; VJPs only), so the
  basis lies in the row space of J from the first step; each iteration is a Rayleigh-Ritz step on the whole basis
  and adds the residuals of the Ritz pairs that have not converged. Since ``J^T J Q`` is kept for the basis ``Q``,
  each Ritz pair's residual ``||J^T J v - lam v|| / lam`` is exact and free: the iterations stop when every one of
  the k is below ``tol`` (so ``|lam - lam_true| <= tol lam``). About 4-5 batched products of ~10-16 vectors for
  k = 10: on a CPU, batching makes a vector of a block several times cheaper than a single product. The blocks
  of ``batch_size // b`` images go through the same calls (each image its own J and basis).
- ``eigsh`` (ARPACK Lanczos, :func:`eigsh_top`): one product ``J^T J v`` at a time (~25-35 for k = 10), each one
  forward-mode JVP and one VJP; the fewest products, but each pays a whole pass of the model. ARPACK stops on the
  same relative residual ``tol``.
- ``explicit`` (:func:`explicit_top`): J itself (K x D) from K VJPs in batches, then the exact eigenpairs of the
  smaller of ``J J^T`` (K x K) and ``J^T J``; cheapest when K is small, memory K x D.

All three run with the model's eval-mode batch norms folded into per-channel affines and, in the JVPs, the
buffers of those and of the input normalization dual (:mod:`~neuroguide.evaluation.analyses.subspace.forward_mode`:
exact rewrites that spare functorch's efficient-zero tangents, a large part of a product on a CPU); the model is
put back as it was.

Memory of the matrix-free methods: one forward graph, whatever K, times the vectors of a batch
(``batch_size``). J^T J has rank <= K, so k may not exceed K (nor reach D).

Two subspaces ``P_i, P_j`` (D x k, orthonormal) are compared by the mean squared cosine of their k principal
angles, ``sim(P_i, P_j) = ||P_i^T P_j||_F^2 / k`` (1: the same subspace; 0: orthogonal). Two independent
uniformly random k-dimensional subspaces of R^D have ``E[sim] = k / D`` (:func:`random_baseline`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from neuroguide.evaluation.analyses.subspace.forward_mode import folded_batchnorm
from neuroguide.evaluation.analyses.subspace.solvers import (METHODS, RANK_TOL, GramOperator, block_krylov_top,
                                                             check_k, check_method, choose_method, default_block_size,
                                                             eigsh_top, explicit_top)
from neuroguide.evaluation.metrics import statistics
from neuroguide.evaluation.responses import response_function
from neuroguide.evaluation.checks import safe_name
from neuroguide.models.features import device_of, evaluation_mode

log = logging.getLogger("neuroguide")


@dataclass
class Subspaces:
    """Perturbation subspaces of one model at N images.

    Attributes:
        eigenvalues: (N, k) float64, descending: the top eigenvalues of J^T J at each image.
        eigenvectors: (N, D, k) float32, orthonormal columns (D = 3 S S, pixel order of (3, S, S)).
        n_products: (N,) products J^T J v the solver needed per image (one JVP and one VJP each).
        n_vjp: (N,) further vectors multiplied by J^T alone (the block start; the explicit Jacobian's K rows).
        iterations: (N,) block iterations (0 for eigsh and explicit).
        response_dim: K, the length of the response vector; ``layer``: its name; ``method``: the solver used;
        ``reason``: why (auto's choice in words).
    """

    eigenvalues: np.ndarray
    eigenvectors: torch.Tensor
    n_products: np.ndarray
    response_dim: int
    input_shape: tuple
    layer: str
    method: str
    n_vjp: np.ndarray | None = None
    iterations: np.ndarray | None = None
    reason: str = ""

    @property
    def k(self) -> int:
        return self.eigenvalues.shape[1]

    @property
    def D(self) -> int:
        return int(np.prod(self.input_shape))


def perturbation_subspaces(model: nn.Module, images: torch.Tensor, *, k: int = 10, layer: str | None = "region",
                           units: Sequence[int] | None = None, method: str = "auto", tol: float = 1e-4,
                           max_iter: int | None = None, batch_size: int = 64, block_size: int | None = None,
                           seed: int | None = 0, progress: bool = True, key: str = "eval.subspace") -> Subspaces:
    """The top-k eigenpairs of ``J^T J`` at each image (see the module docstring).

    Args:
        model: takes (B, 3, S, S) images in [0, 1]; run in eval mode, its modes and flags restored after.
        images: (N, 3, S, S) in [0, 1].
        k: eigenpairs per image (1 <= k <= K, k < D).
        layer, units: the response (:func:`~neuroguide.evaluation.responses.response_function`; "region": the
            region response).
        method: "auto" (:func:`choose_method`), "block", "eigsh" or "explicit".
        tol: block and eigsh: relative residual ``||J^T J v - lam v|| / lam`` every eigenpair must reach (products
            are float32: keep it >= ~1e-6); explicit: exact.
        max_iter: block iterations / eigsh restarts (None: 100 / ARPACK's default).
        batch_size: rows (images x vectors) per vmapped JVP / VJP call (memory: one forward graph per row); the
            block method solves ``batch_size // block_size`` images together, their blocks in the same calls.
        block_size: the block method's block b >= k (None: :func:`default_block_size`).
        seed: the solvers' random start (per image); None: unseeded.
    """
    check_method(method, key)
    if images.ndim != 4:
        raise ValueError(f"images: expected (N, 3, S, S) in [0, 1], got shape {tuple(images.shape)}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
                                   or block_size < 1):
        raise ValueError(f"{key}.block_size={block_size!r}: expected a whole number >= k (or null: k + max(4, k/2))")
    device = device_of(model)
    D = int(np.prod(images.shape[1:]))
    vals, vecs, counts, vjps, iters = [], [], [], [], []
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if not len(images):
        raise ValueError("images is empty: give at least one image")
    with evaluation_mode(model), folded_batchnorm(model) as n_folded:  # exact; cheaper products
        forward, name = response_function(model, layer, units, key=f"{key}.layer")
        if n_folded:
            log.debug("subspace (%s): %d eval-mode batch norms folded into per-channel affines for the products",
                      name, n_folded)
        with torch.no_grad():
            y = forward(images[:1].to(device=device, dtype=torch.float32))
        if y.ndim != 2:
            raise ValueError(f"the response function must map (B, 3, S, S) to (B, K); got {tuple(y.shape)} for one image")
        kk = check_k(k, int(y.shape[1]), D, key)
        b = max(block_size or default_block_size(kk), kk)
        solver, reason = choose_method(method, int(y.shape[1]), kk, b, batch_size, key)
        log.info("subspace (%s): method %s (%s)", name, solver, reason)
        group = max(1, batch_size // b) if solver == "block" else 1  # block: images solved together
        for start in tqdm(range(0, len(images), group), desc=f"subspaces ({solver}, k={k})", disable=not progress,
                          leave=False):
            op = GramOperator(forward, images[start:start + group].to(device=device, dtype=torch.float32),
                              batch_size, key)
            if solver == "block":
                for j, (lam, vec, history, n_prod) in enumerate(block_krylov_top(op, kk, tol, max_iter, b, gen, key)):
                    log.info("subspace (%s) image %d: block converged in %d iterations (%d products J^T J v in "
                             "blocks of <= %d, %d VJPs to start; %d images per batched call); largest relative "
                             "residual per iteration %s (tol %g)", name, start + j, len(history), n_prod, b,
                             min(b, op.K), op.N, " -> ".join(f"{h:.1e}" for h in history), tol)
                    vals.append(lam)
                    vecs.append(torch.from_numpy(np.ascontiguousarray(vec)).float())
                    counts.append(n_prod)
                    vjps.append(min(b, op.K))
                    iters.append(len(history))
                continue
            if solver == "eigsh":
                lam, vec, history = eigsh_top(op, kk, tol, max_iter, torch.randn(D, generator=gen,
                                                                                dtype=torch.float64), key)
            else:
                lam, vec, history = explicit_top(op, kk)
            vals.append(lam)
            vecs.append(torch.from_numpy(np.ascontiguousarray(vec)).float())
            counts.append(op.n_products)
            vjps.append(op.n_vjp)
            iters.append(len(history))
    lam = np.stack(vals)
    low = lam[:, -1] <= RANK_TOL * np.maximum(lam[:, 0], np.finfo(float).tiny)
    if low.any():  # rank(J) < k (e.g. dead output units): the trailing eigenvectors are any basis of a null space
        log.warning("subspace (%s): at %d of %d images the k-th eigenvalue of J^T J is <= %g x the first: J has rank "
                    "< k=%d there, so the trailing eigenvectors are arbitrary directions and lower every similarity at "
                    "random. Use a smaller %s.k (or more response units)", name, int(low.sum()), len(lam), RANK_TOL,
                    lam.shape[1], key)
    return Subspaces(lam, torch.stack(vecs), np.asarray(counts), op.K, tuple(images.shape[1:]), name, solver,
                     np.asarray(vjps), np.asarray(iters), reason)


def subspace_similarity(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine of the principal angles, ``||P^T Q||_F^2 / k``, of (..., D, k) orthonormal bases
    (leading dims batched; k = P's columns) -> (...) float64 in [0, 1]."""
    if P.shape[-2] != Q.shape[-2]:
        raise ValueError(f"subspaces of different input dimensions D={P.shape[-2]} and D={Q.shape[-2]} cannot be "
                         "compared: the models take images of different sizes")
    M = P.double().transpose(-1, -2) @ Q.double()
    return M.square().sum((-2, -1)) / P.shape[-1]


def random_baseline(k: int, D: int) -> float:
    """``E[sim]`` of two independent uniformly random k-dimensional subspaces of R^D: k / D."""
    return k / D


def similarity_matrix(subspaces: dict[str, Subspaces]) -> tuple[np.ndarray, np.ndarray]:
    """(M, M) model x model similarity, mean and sd over the images (the same images for every model; the sd as
    :func:`neuroguide.evaluation.metrics.statistics.sd`: ddof 1, NaN with one image)."""
    names = list(subspaces)
    n = {len(s.eigenvalues) for s in subspaces.values()}
    if len(n) > 1:
        raise ValueError(f"the models' subspaces were computed on different numbers of images {sorted(n)}")
    mean, sd = np.eye(len(names)), np.zeros((len(names), len(names)))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            s = subspace_similarity(subspaces[a].eigenvectors, subspaces[b].eigenvectors).numpy()
            mean[i, j], sd[i, j] = s.mean(), statistics.sd(s)
    return mean, sd


def _spectrum_panel(subspaces: dict[str, Subspaces]) -> dict:
    curves = []
    for name, s in subspaces.items():
        mean = s.eigenvalues.mean(0)
        curves.append({"x": np.arange(1, s.k + 1), "y": mean, "yerr": statistics.sd(s.eigenvalues, dim=0).numpy(),
                       "label": name})
    return {"title": "spectrum of J^T J\n(mean over images, band: sd)", "xlabel": "eigenvalue index i",
            "ylabel": "eigenvalue (squared response change)", "curves": curves, "integer_x": True}


def _spectrum_metrics(s: Subspaces, prefix: str) -> dict:
    m = {f"{prefix}/eigenvalue_{i + 1}": float(v) for i, v in enumerate(s.eigenvalues.mean(0))}
    m[f"{prefix}/n_products"] = float(s.n_products.mean())
    m[f"{prefix}/n_vjp"] = float(s.n_vjp.mean())
    m[f"{prefix}/iterations"] = float(s.iterations.mean())
    m[f"{prefix}/response_dim"] = s.response_dim
    return m


def _compute(model, images, name: str, p: dict, progress: bool) -> Subspaces:
    s = perturbation_subspaces(model, images, progress=progress, **p)
    log.info("subspace %s: k=%d of K=%d outputs (%s), D=%d, method %s: per image %.0f products J^T J v, %.0f further "
             "VJPs, %.1f block iterations; top eigenvalues (mean over %d images) %s", name, s.k, s.response_dim,
             s.layer, s.D, s.method, s.n_products.mean(), s.n_vjp.mean(), s.iterations.mean(), len(images),
             np.array2string(s.eigenvalues.mean(0)[:5], precision=4))
    return s


def evaluate(model: nn.Module, images: torch.Tensor, out_dir, *, n_images: int | None = None,
             key_prefix: str = "eval/subspace", progress: bool = True, **params) -> dict:
    """One model (``ckpt=`` mode): the spectrum ``{key_prefix}/eigenvalue_<i>`` (mean over the first
    ``n_images`` images), ``n_products``, ``n_vjp``, ``iterations``, ``response_dim``; ``subspace_spectrum.png`` and ``.csv``."""
    from neuroguide.evaluation.plots import curve_figure, write_csv

    images = images[:n_images] if n_images else images
    s = _compute(model, images, "model", params, progress)
    out_dir = Path(out_dir)
    write_csv(out_dir / "subspace_spectrum.csv",
              [{"image": n, "index": i + 1, "eigenvalue": float(v)} for n, row in enumerate(s.eigenvalues)
               for i, v in enumerate(row)])
    curve_figure([_spectrum_panel({s.layer: s})], out_dir / "subspace_spectrum.png", logy=True)
    return _spectrum_metrics(s, key_prefix)


def evaluate_models(models: Mapping[str, nn.Module], images: torch.Tensor, out_dir, *, n_images: int | None = None,
                    key_prefix: str = "eval/subspace", input_sizes: Mapping[str, int] | None = None,
                    progress: bool = True, **params) -> dict:
    """Several models on the same images (``models=`` / ``sweep_dir=`` modes): each model's spectrum
    (``{key_prefix}/<model>/eigenvalue_<i>``), the model x model similarity averaged over images
    (``{key_prefix}/<a>/<b>/similarity``, every ordered pair, the diagonal included) and the random-subspace
    baseline k/D (``{key_prefix}/random_baseline``); ``subspace_similarity.png`` (heatmap), ``.csv``,
    ``subspace_spectrum.png``. All models must take the images' size (the subspaces live in pixel space)."""
    from neuroguide.evaluation.plots import curve_figure, heatmap_figure, write_csv
    from neuroguide.evaluation.checks import check_input_sizes

    if not models:
        raise ValueError("models is empty: give at least one model")
    images = images[:n_images] if n_images else images
    check_input_sizes(models, images, input_sizes, analysis="subspace")
    subs = {name: _compute(m, images, name, params, progress) for name, m in models.items()}
    names = list(subs)
    mean, sd = similarity_matrix(subs)
    first = subs[names[0]]
    base = random_baseline(first.k, first.D)
    metrics: dict = {f"{key_prefix}/random_baseline": base, f"{key_prefix}/k": first.k, f"{key_prefix}/D": first.D}
    rows = []
    for i, a in enumerate(names):
        metrics.update(_spectrum_metrics(subs[a], f"{key_prefix}/{safe_name(a)}"))
        for j, b in enumerate(names):
            metrics[f"{key_prefix}/{safe_name(a)}/{safe_name(b)}/similarity"] = float(mean[i, j])
            rows.append({"a": a, "b": b, "similarity": float(mean[i, j]), "sd_over_images": float(sd[i, j]),
                         "random_baseline": base, "k": first.k, "D": first.D, "n_images": len(images)})
    off = ~np.eye(len(names), dtype=bool)
    if len(names) > 1:
        metrics[f"{key_prefix}/offdiag_mean"] = float(mean[off].mean())
    log.info("subspace similarity (mean over %d images; random baseline k/D = %d/%d = %.3g):\n%s", len(images),
             first.k, first.D, base, "\n".join(f"  {a}: " + " ".join(f"{v:.4f}" for v in mean[i])
                                                for i, a in enumerate(names)))
    out_dir = Path(out_dir)
    write_csv(out_dir / "subspace_similarity.csv", rows)
    heatmap_figure([(f"subspace similarity, k={first.k}, {len(images)} images\nrandom baseline k/D = {base:.2g}", mean)],
                   names, names, out_dir / "subspace_similarity.png", xlabel="", ylabel="",
                   cbar_label="||P_a^T P_b||_F^2 / k", vmin=0.0, vmax=1.0)
    curve_figure([_spectrum_panel(subs)], out_dir / "subspace_spectrum.png", logy=True)
    return metrics


__all__ = ["GramOperator", "Subspaces", "perturbation_subspaces", "subspace_similarity", "similarity_matrix",
           "random_baseline", "check_k", "METHODS", "choose_method", "block_krylov_top", "explicit_top", "eigsh_top",
           "evaluate", "evaluate_models"]
