"""Perturbation subspaces (McNeal & Murty): the image directions a model's response is most sensitive to.

For an image ``x`` (D = 3 S S pixels) and a model's response vector ``r(x)`` (K outputs: the voxels of a
region, IT sites, a guided classifier's neural head; :func:`neuroguide.evaluation.responses.response_function`),
a small perturbation ``d`` changes the response by ``r(x + d) - r(x) ~ J d`` (J = dr/dx, K x D), so

    ||r(x + d) - r(x)||^2 ~ d^T (J^T J) d,

and the directions that change the response most, per unit L2 norm, are the top eigenvectors of ``J^T J``.
The top k of them, stacked as the columns of ``P`` (D x k, orthonormal), are the model's *perturbation
subspace* at ``x``; the eigenvalues are the squared response changes along them (the spectrum).

The eigenpairs are found **matrix-free**: ``J^T J`` (D x D) and ``J`` (K x D) are never formed. Each product
``v -> J^T (J v)`` is one forward-mode JVP (``J v``, ``torch.autograd.forward_ad``) and one reverse-mode VJP
(``J^T u``, ``torch.func.vjp``, whose forward pass is kept once per image) of the model, and the solvers need
only products: ARPACK's Lanczos method (``scipy.sparse.linalg.eigsh`` on a ``LinearOperator``,
``method="eigsh"``, the default) or LOBPCG (``torch.lobpcg``, ``method="lobpcg"``, block products batched).
Memory is one forward graph, whatever K; time is ~25-35 products for k = 10 (benchmarks/subspace.py). J^T J has
rank <= K, so k may not exceed K (nor reach D).

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
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from neuroguide.evaluation.metrics import statistics
from neuroguide.evaluation.responses import response_function
from neuroguide.evaluation.checks import safe_name
from neuroguide.models.features import device_of, evaluation_mode

METHODS = ("eigsh", "lobpcg")
log = logging.getLogger("neuroguide")
RANK_TOL = 1e-8  # an eigenvalue at most this fraction of the largest counts as zero (rank(J) < k)


class GramOperator:
    """``v -> J^T J v`` at one image, matrix-free: one JVP and one VJP of ``forward`` per vector.

    Args:
        forward: maps (B, 3, S, S) images to (B, K) responses (the model in eval mode).
        x: (3, S, S) or (1, 3, S, S) image.
        batch_size: at most this many vectors per vmapped product in :meth:`matmat`.
    Attributes:
        response: (K,) the response r(x); ``shape`` = (D, D); ``n_products``: vectors multiplied so far.
    """

    def __init__(self, forward: nn.Module, x: torch.Tensor, batch_size: int = 32, key: str = "eval.subspace"):
        self.forward = forward
        self.x = x.reshape(1, *x.shape[-3:]).detach()
        self.input_shape = tuple(self.x.shape[1:])
        self.D = int(np.prod(self.input_shape))
        self.batch_size = max(1, int(batch_size))
        y, self._vjp = torch.func.vjp(forward, self.x)  # the forward pass kept for every VJP
        if y.ndim != 2 or y.shape[0] != 1:
            raise ValueError(f"the response function must map (B, 3, S, S) to (B, K); got {tuple(y.shape)} for one image")
        if not torch.isfinite(y).all():
            bad = int((~torch.isfinite(y)).sum())
            raise ValueError(f"the model's response to this image has {bad} NaN/inf values of {y.shape[1]}: its "
                             "Jacobian is undefined. Check the image (finite, in [0, 1]) and the model (its weights, "
                             f"its {key}.layer)")
        self.response = y.detach()[0]
        self.K = int(y.shape[1])
        self.shape = (self.D, self.D)
        self.n_products = 0

    def _jvp(self, T: torch.Tensor) -> torch.Tensor:
        """(m, 3, S, S) tangents -> (m, K) ``J t`` for each row: forward-mode AD on m copies of the image
        (``torch.autograd.forward_ad``, the engine under ``torch.func.jvp``, which was 1.3-3x slower on a ResNet
        here; the model is in eval mode, so the rows are independent)."""
        X = self.x.expand(T.shape[0], *self.input_shape).contiguous()
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(self.forward(fwAD.make_dual(X, T))).tangent
        return torch.zeros(T.shape[0], self.K, dtype=X.dtype, device=X.device) if tangent is None else tangent

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """(D, m) -> (D, m) ``J^T J V`` (in V's dtype; products in the image's dtype on its device), at most
        ``batch_size`` vectors at a time."""
        dtype, m = V.dtype, V.shape[1]
        T = V.T.to(device=self.x.device, dtype=self.x.dtype).reshape(m, *self.input_shape)
        outs = []
        with torch.no_grad():
            for b in range(0, m, self.batch_size):
                JV = self._jvp(T[b:b + self.batch_size])  # (c, K)
                if JV.shape[0] == 1:
                    outs.append(self._vjp(JV)[0])
                else:  # one batched backward pass through the kept graph for c cotangents
                    outs.append(torch.func.vmap(lambda u: self._vjp(u[None])[0][0])(JV))
        out = torch.cat(outs).reshape(m, self.D)
        if not torch.isfinite(out).all():
            raise ValueError("a product J^T J v of the model is NaN/inf (its gradient is not finite at this image): "
                             "the perturbation subspace is undefined here")
        self.n_products += m
        return out.T.to(dtype=dtype, device=V.device)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """(D,) -> (D,) ``J^T J v``."""
        return self.matmat(v.reshape(-1, 1))[:, 0]


def check_k(k, K: int, D: int, method: str = "eigsh", key: str = "eval.subspace") -> int:
    """``k`` as an int, or a ValueError naming ``{key}.k``: 1 <= k <= K (J^T J has rank <= K) and k < D
    (eigsh), 3 k <= D (lobpcg)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{key}.k={k!r}: expected a whole number >= 1 (the eigenvectors per subspace), e.g. 10")
    k = int(k)
    if k > K:
        raise ValueError(f"{key}.k={k} exceeds the response dimension K={K}: J^T J has rank <= K, so at most K of "
                         f"its eigenvalues are nonzero and the other directions are arbitrary. Set {key}.k <= {K}, or "
                         f"use a response with more units ({key}.units / {key}.layer)")
    if k >= D:
        raise ValueError(f"{key}.k={k} is not below the input dimension D={D} (3 x S x S pixels): the subspace would "
                         f"be all of pixel space. Set {key}.k < {D}")
    if method == "lobpcg" and 3 * k > D:
        raise ValueError(f"{key}.k={k}: LOBPCG needs 3 k <= D={D}; set {key}.k <= {D // 3} or {key}.method=eigsh")
    return k


def check_method(method: str, key: str = "eval.subspace") -> str:
    if method not in METHODS:
        raise ValueError(f"{key}.method={method!r} is not known: expected one of {list(METHODS)} (eigsh: ARPACK "
                         "Lanczos, scipy; lobpcg: torch.lobpcg)")
    return method


def eigsh_top(op: GramOperator, k: int, tol: float, max_iter: int | None, v0: torch.Tensor,
              key: str = "eval.subspace") -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenpairs by ARPACK (``eigsh``, which="LA") on a ``LinearOperator`` in float64.

    Returns eigenvalues (k,) descending and eigenvectors (D, k)."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    def mv(v):
        return op.matmat(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(op.D, -1))).numpy()

    lin = LinearOperator(op.shape, matvec=mv, matmat=mv, dtype=np.float64)
    try:
        vals, vecs = eigsh(lin, k=k, which="LA", tol=tol, maxiter=max_iter, v0=v0.double().numpy())
    except ArpackNoConvergence as e:
        raise RuntimeError(f"eigsh did not converge to {k} eigenpairs ({len(e.eigenvalues)} converged) within "
                           f"{key}.max_iter={max_iter} restarts at {key}.tol={tol}: raise {key}.max_iter or "
                           f"{key}.tol") from None
    order = np.argsort(vals)[::-1]
    return vals[order], vecs[:, order]


class _OperatorMode(TorchFunctionMode):
    """While active, ``torch.matmul(A, X)`` with the placeholder ``A`` is ``op.matmat(X)``: how a matrix-free
    operator enters ``torch.lobpcg``, which takes A as a tensor. Any other use of the placeholder is refused."""

    def __init__(self, placeholder: torch.Tensor, op: GramOperator):
        super().__init__()
        self.A, self.op = placeholder, op

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and args and args[0] is self.A:
            return self.op.matmat(args[1])
        if any(a is self.A for a in args) and getattr(func, "__name__", "") != "__get__":  # attribute reads pass
            raise RuntimeError(f"torch.lobpcg used the matrix-free operator in {func}, which only matmul supports")
        return func(*args, **kwargs)


def lobpcg_top(op: GramOperator, k: int, tol: float, max_iter: int | None, X0: torch.Tensor,
               key: str = "eval.subspace") -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenpairs by ``torch.lobpcg`` (float64, block of k; block products vmapped).

    Returns eigenvalues (k,) descending and eigenvectors (D, k); a RuntimeError if fewer than k converged."""
    A = torch.zeros((), dtype=torch.float64).expand(op.D, op.D)  # a (D, D) placeholder holding one number
    state = {}

    def tracker(worker):
        state.update(converged=int(worker.ivars["converged_count"]), steps=int(worker.ivars["istep"]))

    niter = 1000 if max_iter is None else int(max_iter)
    with _OperatorMode(A, op):
        vals, vecs = torch.lobpcg(A, k=k, X=X0.double(), niter=niter, tol=tol, largest=True, tracker=tracker)
    if state.get("converged", 0) < k:
        raise RuntimeError(f"torch.lobpcg did not converge to {k} eigenpairs ({state.get('converged', 0)} converged) "
                           f"within {key}.max_iter={niter} iterations at {key}.tol={tol}: raise {key}.max_iter or "
                           f"{key}.tol, or use {key}.method=eigsh")
    vals, vecs = vals.numpy(), vecs.numpy()
    order = np.argsort(vals)[::-1]
    return vals[order], vecs[:, order]


@dataclass
class Subspaces:
    """Perturbation subspaces of one model at N images.

    Attributes:
        eigenvalues: (N, k) float64, descending: the top eigenvalues of J^T J at each image.
        eigenvectors: (N, D, k) float32, orthonormal columns (D = 3 S S, pixel order of (3, S, S)).
        n_products: (N,) products J^T J v the solver needed per image.
        response_dim: K, the length of the response vector; ``layer``: its name; ``method``: the solver.
    """

    eigenvalues: np.ndarray
    eigenvectors: torch.Tensor
    n_products: np.ndarray
    response_dim: int
    input_shape: tuple
    layer: str
    method: str

    @property
    def k(self) -> int:
        return self.eigenvalues.shape[1]

    @property
    def D(self) -> int:
        return int(np.prod(self.input_shape))


def perturbation_subspaces(model: nn.Module, images: torch.Tensor, *, k: int = 10, layer: str | None = "region",
                           units: Sequence[int] | None = None, method: str = "eigsh", tol: float = 1e-5,
                           max_iter: int | None = None, batch_size: int = 32, seed: int | None = 0,
                           progress: bool = True, key: str = "eval.subspace") -> Subspaces:
    """The top-k eigenpairs of ``J^T J`` at each image, matrix-free (see the module docstring).

    Args:
        model: takes (B, 3, S, S) images in [0, 1]; run in eval mode, its modes and flags restored after.
        images: (N, 3, S, S) in [0, 1].
        k: eigenpairs per image (1 <= k <= K, k < D).
        layer, units: the response (:func:`~neuroguide.evaluation.responses.response_function`; "region": the
            region response).
        method: "eigsh" (ARPACK Lanczos, ``tol`` = relative accuracy of the eigenvalues) or "lobpcg"
            (``tol`` = relative residual; products are float32, so keep it >= ~1e-6).
        max_iter: eigsh restarts / lobpcg iterations (None: the solver's default).
        batch_size: vectors per vmapped product (LOBPCG blocks).
        seed: the solver's random start (per image); None: unseeded.
    """
    check_method(method, key)
    if images.ndim != 4:
        raise ValueError(f"images: expected (N, 3, S, S) in [0, 1], got shape {tuple(images.shape)}")
    forward, name = response_function(model, layer, units, key=f"{key}.layer")
    device = device_of(model)
    D = int(np.prod(images.shape[1:]))
    vals, vecs, counts = [], [], []
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with evaluation_mode(model):
        for n in tqdm(range(len(images)), desc=f"subspaces ({method}, k={k})", disable=not progress, leave=False):
            op = GramOperator(forward, images[n].to(device=device, dtype=torch.float32), batch_size, key)
            kk = check_k(k, op.K, D, method, key)
            start = torch.randn(D, kk if method == "lobpcg" else 1, generator=gen, dtype=torch.float64)
            if method == "eigsh":
                lam, vec = eigsh_top(op, kk, tol, max_iter, start[:, 0], key)
            else:
                lam, vec = lobpcg_top(op, kk, tol, max_iter, start, key)
            vals.append(lam)
            vecs.append(torch.from_numpy(np.ascontiguousarray(vec)).float())
            counts.append(op.n_products)
    if not vals:
        raise ValueError("images is empty: give at least one image")
    lam = np.stack(vals)
    low = lam[:, -1] <= RANK_TOL * np.maximum(lam[:, 0], np.finfo(float).tiny)
    if low.any():  # rank(J) < k (e.g. dead output units): the trailing eigenvectors are any basis of a null space
        log.warning("subspace (%s): at %d of %d images the k-th eigenvalue of J^T J is <= %g x the first: J has rank "
                    "< k=%d there, so the trailing eigenvectors are arbitrary directions and lower every similarity at "
                    "random. Use a smaller %s.k (or more response units)", name, int(low.sum()), len(lam), RANK_TOL,
                    lam.shape[1], key)
    return Subspaces(np.stack(vals), torch.stack(vecs), np.asarray(counts), op.K, tuple(images.shape[1:]), name, method)


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
    m[f"{prefix}/response_dim"] = s.response_dim
    return m


def _compute(model, images, name: str, p: dict, progress: bool) -> Subspaces:
    s = perturbation_subspaces(model, images, progress=progress, **p)
    log.info("subspace %s: k=%d of K=%d outputs (%s), D=%d, %.0f products J^T J v per image (%s); top eigenvalues "
             "(mean over %d images) %s", name, s.k, s.response_dim, s.layer, s.D, s.n_products.mean(), s.method,
             len(images), np.array2string(s.eigenvalues.mean(0)[:5], precision=4))
    return s


def evaluate(model: nn.Module, images: torch.Tensor, out_dir, *, n_images: int | None = None,
             key_prefix: str = "eval/subspace", progress: bool = True, **params) -> dict:
    """One model (``ckpt=`` mode): the spectrum ``{key_prefix}/eigenvalue_<i>`` (mean over the first
    ``n_images`` images), ``n_products``, ``response_dim``; ``subspace_spectrum.png`` and ``.csv``."""
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
           "random_baseline", "check_k", "METHODS", "evaluate", "evaluate_models"]
