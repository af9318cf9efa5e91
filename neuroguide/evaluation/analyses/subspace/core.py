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
import torch.autograd.forward_ad as fwAD
from torch import nn
from tqdm.auto import tqdm

from neuroguide.evaluation.metrics import statistics
from neuroguide.evaluation.responses import response_function
from neuroguide.evaluation.checks import safe_name
from neuroguide.models.features import device_of, evaluation_mode

METHODS = ("auto", "block", "eigsh", "explicit")
SOLVERS = METHODS[1:]
log = logging.getLogger("neuroguide")
RANK_TOL = 1e-8  # an eigenvalue at most this fraction of the largest counts as zero (rank(J) < k)


class GramOperator:
    """``J`` and ``J^T`` of ``forward`` at N images at once (each image its own J), matrix-free, batched: ``J V`` by
    vmapped forward-mode JVPs, ``J^T U`` by vmapped VJPs through the forward pass kept once, ``J^T J V`` by both.

    The model is in eval mode, so the images of a batch are independent: one vmapped call multiplies m vectors of
    each of the N images (N m rows; the primal pass runs once for the N images, only the tangents are batched).

    Args:
        forward: maps (B, 3, S, S) images to (B, K) responses (the model in eval mode).
        x: (N, 3, S, S) images, or one (3, S, S) image.
        batch_size: at most this many rows (images x vectors) per vmapped JVP / VJP call.
    Attributes:
        response: (N, K) the responses r(x); ``shape`` = (D, D); ``n_products``: vectors v (per image) multiplied by
        J^T J so far; ``n_vjp``: further vectors u (per image) multiplied by J^T alone (a block start, the explicit
        Jacobian's rows).
    """

    def __init__(self, forward: nn.Module, x: torch.Tensor, batch_size: int = 32, key: str = "eval.subspace"):
        self.forward = forward
        self.x = x.reshape(-1, *x.shape[-3:]).detach()
        self.N = int(self.x.shape[0])
        self.input_shape = tuple(self.x.shape[1:])
        self.D = int(np.prod(self.input_shape))
        self.batch_size = max(1, int(batch_size))
        self._chunk = max(1, self.batch_size // self.N)  # vectors per image per call
        y, self._vjp = torch.func.vjp(forward, self.x)  # the forward pass kept for every VJP
        if y.ndim != 2 or y.shape[0] != self.N:
            raise ValueError(f"the response function must map (B, 3, S, S) to (B, K); got {tuple(y.shape)} for "
                             f"{self.N} image(s)")
        if not torch.isfinite(y).all():
            bad = int((~torch.isfinite(y)).sum())
            raise ValueError(f"the model's response to this image has {bad} NaN/inf values of {y.shape[1]}: its "
                             "Jacobian is undefined. Check the image (finite, in [0, 1]) and the model (its weights, "
                             f"its {key}.layer)")
        self.response = y.detach()
        self.K = int(y.shape[1])
        self.shape = (self.D, self.D)
        self.n_products = 0
        self.n_vjp = 0

    def _jvp1(self, t: torch.Tensor) -> torch.Tensor:
        """(1, 3, S, S) tangent of one image -> (1, K) ``J t`` by ``torch.autograd.forward_ad`` (for one vector ~10%
        faster than ``torch.func.jvp``)."""
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(self.forward(fwAD.make_dual(self.x, t))).tangent
        return torch.zeros(1, self.K, dtype=self.x.dtype, device=self.x.device) if tangent is None else tangent

    def _rvjp(self, U: torch.Tensor) -> torch.Tensor:
        """(c, N, K) cotangents -> (c, N, 3, S, S) ``J^T u``: one batched backward pass through the kept graph."""
        if U.shape[0] == 1:
            return self._vjp(U[0])[0][None]
        return torch.func.vmap(lambda u: self._vjp(u)[0])(U)

    def _gram(self, T: torch.Tensor) -> torch.Tensor:
        """(c, N, 3, S, S) -> (c, N, 3, S, S) ``J^T J t``. A block: one vmapped call of ``torch.func.jvp`` over the
        tangents only (the primal pass runs once, unbatched over c; 1.5-2x faster than forward AD on c copies of the
        images here) and of the VJP through the kept graph."""
        if T.shape[0] == 1 and self.N == 1:
            return self._rvjp(self._jvp1(T[0])[None])
        return torch.func.vmap(lambda t: self._vjp(torch.func.jvp(self.forward, (self.x,), (t,))[1])[0])(T)

    def _finite(self, out: torch.Tensor, what: str) -> torch.Tensor:
        if not torch.isfinite(out).all():
            raise ValueError(f"a product {what} of the model is NaN/inf (its gradient is not finite at this image): "
                             "the perturbation subspace is undefined here")
        return out

    def _apply(self, fn, V: torch.Tensor, rows: int, what: str) -> torch.Tensor:
        """(N, rows, m) or, for one image, (rows, m) -> (N, D, m) / (D, m): ``fn`` on chunks of vectors, in V's
        dtype and device (products in the images' dtype on their device)."""
        one = V.ndim == 2
        V = V[None] if one else V
        if V.shape[:2] != (self.N, rows):
            raise ValueError(f"expected ({self.N}, {rows}, m) vectors, got {tuple(V.shape)}")
        dtype, device, m = V.dtype, V.device, V.shape[2]
        T = V.permute(2, 0, 1).to(device=self.x.device, dtype=self.x.dtype)
        if rows == self.D:
            T = T.reshape(m, self.N, *self.input_shape)
        with torch.no_grad():
            out = torch.cat([fn(T[b:b + self._chunk]) for b in range(0, m, self._chunk)])
        out = self._finite(out.reshape(m, self.N, self.D), what).permute(1, 2, 0).to(dtype=dtype, device=device)
        return out[0] if one else out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """(N, D, m) (or (D, m) for one image) -> ``J^T J V`` per image, same shape."""
        out = self._apply(self._gram, V, self.D, "J^T J v")
        self.n_products += V.shape[-1]
        return out

    def rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        """(N, K, m) (or (K, m)) -> (N, D, m) (or (D, m)) ``J^T U`` per image, VJPs only."""
        out = self._apply(self._rvjp, U, self.K, "J^T u")
        self.n_vjp += U.shape[-1]
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """(D,) -> (D,) ``J^T J v`` (one image)."""
        return self.matmat(v.reshape(-1, 1))[:, 0]


def check_k(k, K: int, D: int, key: str = "eval.subspace") -> int:
    """``k`` as an int, or a ValueError naming ``{key}.k``: 1 <= k <= K (J^T J has rank <= K) and k < D."""
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
    return k


def check_method(method: str, key: str = "eval.subspace") -> str:
    if method == "lobpcg":
        raise ValueError(f"{key}.method=lobpcg was replaced by {key}.method=block (block Krylov: batched products "
                         "like LOBPCG's, fewer of them); or use auto")
    if method not in METHODS:
        raise ValueError(f"{key}.method={method!r} is not known: expected one of {list(METHODS)} (auto: chosen by K; "
                         "block: block Krylov; eigsh: ARPACK Lanczos, one product at a time; explicit: the full "
                         "Jacobian)")
    return method


EXPLICIT_FACTOR = 12  # auto: explicit while K <= EXPLICIT_FACTOR x the block size (benchmarks/subspace.py)


def default_block_size(k: int) -> int:
    """The block method's block: k Ritz pairs wanted plus guard vectors, max(4, k // 2) (tuned on
    benchmarks/subspace.py: fewer iterations than a block of k, fewer products than 2 k)."""
    return k + max(4, k // 2)


def choose_method(method: str, K: int, k: int, block_size: int | None = None, batch_size: int = 64,
                  key: str = "eval.subspace") -> tuple[str, str]:
    """The solver for ``method`` and the reason, in words.

    ``auto``: ``explicit`` while K <= EXPLICIT_FACTOR b (b: the block size, at least k; the Jacobian costs K VJPs,
    the block method about as much as ~EXPLICIT_FACTOR b, whatever K, in the benchmark); else ``block``, unless
    ``batch_size`` is below half the block (then batching gains little and ``eigsh``, the fewest products, is
    chosen). A forced method is returned as it is.
    """
    check_method(method, key)
    b = max(block_size or default_block_size(k), k)
    if method != "auto":
        return method, f"forced by {key}.method={method}"
    if K <= EXPLICIT_FACTOR * b:
        return "explicit", (f"auto: K={K} outputs <= {EXPLICIT_FACTOR} x block size {b}: the Jacobian's K VJPs cost "
                            "less than the block iterations")
    if batch_size < max(2, b // 2):
        return "eigsh", (f"auto: K={K} > {EXPLICIT_FACTOR} x block size {b}, but {key}.batch_size={batch_size} < "
                         f"half the block: batched products would gain little, and Lanczos needs the fewest")
    return "block", (f"auto: K={K} outputs > {EXPLICIT_FACTOR} x block size {b}: the explicit Jacobian's K VJPs cost "
                     "more than block products, and batches of the block are cheaper per vector than eigsh's single "
                     "products")


def eigsh_top(op: GramOperator, k: int, tol: float, max_iter: int | None, v0: torch.Tensor,
              key: str = "eval.subspace") -> tuple[np.ndarray, np.ndarray, int]:
    """Top-k eigenpairs by ARPACK (``eigsh``, which="LA") on a ``LinearOperator`` in float64.

    Returns eigenvalues (k,) descending, eigenvectors (D, k) and [] (ARPACK does not expose its restarts)."""
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
    return vals[order], vecs[:, order], []


def _orthonormal_complement(W: torch.Tensor, Q: torch.Tensor | None, rel: float = 1e-10) -> torch.Tensor:
    """(D, m) -> (D, m') orthonormal basis of the part of span(W) orthogonal to Q (D, n; orthonormal columns),
    twice projected out ("twice is enough"); directions below ``rel`` of W's largest are dropped."""
    scale = float(W.norm(dim=0).max()) if W.numel() else 0.0
    for _ in range(2):
        if Q is not None and Q.shape[1]:
            W = W - Q @ (Q.T @ W)
        if not W.numel():
            break
        U, s, _ = torch.linalg.svd(W, full_matrices=False)
        W = U[:, s > rel * max(scale, np.finfo(float).tiny)]
        scale = 1.0
    return W


def block_krylov_top(op: GramOperator, k: int, tol: float, max_iter: int | None, block_size: int,
                     generator: torch.Generator | None = None, key: str = "eval.subspace",
                     max_basis: int | None = None) -> list[tuple[np.ndarray, np.ndarray, list[float], int]]:
    """Top-k eigenpairs of J^T J at each of ``op``'s N images by block Krylov with Rayleigh-Ritz (float64 bases;
    float32 products, the N images' blocks in the same batched calls).

    Per image: start ``Q = orth(J^T Omega)``, Omega (K, b) standard normal (b VJPs). Each iteration: ``A Q`` for the
    new columns, the Ritz pairs ``(theta_i, v_i = Q w_i)`` of ``Q^T A Q``, their exact residuals
    ``r_i = (A Q) w_i - theta_i v_i``; an image is done when ``||r_i|| <= tol theta_i`` for all its top k (an
    eigenvalue lies within ``||r_i||`` of ``theta_i``; an eigenvalue at most RANK_TOL x the first counts as 0 and
    converged); else its basis grows by the residuals of the unconverged pairs among its top b (the next Krylov
    directions, the guard pairs b - k included). Above ``max_basis`` columns (default 8 b) it restarts from the top
    b Ritz vectors, whose products are known. Images that are done leave the batched calls.

    Args:
        block_size: b >= k (capped at K, the rank bound).
        max_iter: iterations (None: 100); a RuntimeError naming ``{key}.max_iter`` / ``{key}.tol`` if unmet.
    Returns:
        per image: eigenvalues (k,) descending, eigenvectors (D, k), the largest relative residual of the top k at
        each iteration (the log's history), and the products J^T J v it needed.
    """
    b = min(max(block_size, k), op.K)
    max_basis = max_basis or 8 * b
    n_iter = 100 if max_iter is None else int(max_iter)
    Omega = torch.randn(op.N, op.K, b, generator=generator, dtype=torch.float64)
    Y = op.rmatmat(Omega)  # (N, D, b)
    Qs = []
    for n in range(op.N):
        Q = _orthonormal_complement(Y[n], None)
        if Q.shape[1] < b:  # rank(J) < b: Q spans J's row space; the rest of the block is null directions of J
            fill = torch.randn(op.D, b - Q.shape[1], generator=generator, dtype=torch.float64)
            Q = torch.cat([Q, _orthonormal_complement(fill, Q)], 1)
        Qs.append(Q)
    AQ = op.matmat(torch.stack(Qs))
    AQs = list(AQ)
    products = [b] * op.N
    history: list[list[float]] = [[] for _ in range(op.N)]
    done: list[tuple | None] = [None] * op.N
    active_op = (tuple(range(op.N)), op)
    for it in range(n_iter):
        new = []
        for n in range(op.N):
            if done[n] is not None:
                new.append(None)
                continue
            Q, AQ = Qs[n], AQs[n]
            H = Q.T @ AQ
            theta, W = torch.linalg.eigh((H + H.T) / 2)
            m = min(b, theta.shape[0])
            theta, W = theta.flip(0)[:m], W.flip(1)[:, :m]
            V, AV = Q @ W, AQ @ W
            R = AV - V * theta
            floor = RANK_TOL * max(float(theta[0]), np.finfo(float).tiny)
            rel = R.norm(dim=0) / theta.clamp_min(floor)
            rel[theta <= floor] = 0.0  # a null direction of J (rank < k): exact, nothing to converge
            history[n].append(float(rel[:k].max()))
            if history[n][-1] <= tol:
                done[n] = (theta[:k].numpy(), V[:, :k].numpy(), history[n], products[n])
                new.append(None)
                continue
            if Q.shape[1] + m > max_basis:  # thick restart: keep the top b Ritz vectors and their products
                Qs[n], AQs[n] = V, AV
            N = _orthonormal_complement(R[:, rel > tol], Qs[n])
            if N.shape[1] == 0:  # the basis is invariant (e.g. it spans J's row space): the Ritz pairs are exact
                log.warning("subspace (block): the Krylov basis is invariant after %d iterations but the residual "
                            "%.2g exceeds %s.tol=%g (float32 products): returning these pairs", it + 1,
                            history[n][-1], key, tol)
                done[n] = (theta[:k].numpy(), V[:, :k].numpy(), history[n], products[n])
            new.append(N if N.shape[1] else None)
        if all(d is not None for d in done):
            return done
        if it == n_iter - 1:
            break
        active = tuple(n for n, N in enumerate(new) if N is not None)
        if active != active_op[0]:  # images done: the kept forward pass of the others only (one forward)
            active_op = (active, GramOperator(op.forward, op.x[list(active)], op.batch_size, key))
        width = max(new[n].shape[1] for n in active)
        block = torch.zeros(len(active), op.D, width, dtype=torch.float64)  # images with fewer columns: zeros
        for i, n in enumerate(active):
            block[i, :, :new[n].shape[1]] = new[n]
        AN = active_op[1].matmat(block)
        for i, n in enumerate(active):
            c = new[n].shape[1]
            Qs[n], AQs[n] = torch.cat([Qs[n], new[n]], 1), torch.cat([AQs[n], AN[i, :, :c]], 1)
            products[n] += c
    worst = max(h[-1] for h, d in zip(history, done) if d is None)
    raise RuntimeError(f"block did not converge to {k} eigenpairs within {key}.max_iter={n_iter} iterations at "
                       f"{key}.tol={tol} (largest relative residual ||J^T J v - lam v|| / lam: {worst:.2g}; "
                       f"products are float32, so a tol below ~1e-6 may be out of reach): raise {key}.max_iter or "
                       f"{key}.tol")


def explicit_top(op: GramOperator, k: int) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Top-k eigenpairs from the explicit Jacobian: J^T = J^T I_K by K VJPs (batched), then the exact eigenpairs
    (float64 ``eigh``) of the smaller Gram matrix: ``J J^T`` (K x K; eigenvectors ``v = J^T u / sqrt(lam)``) or,
    for K > D, ``J^T J``. Memory K x D. Returns eigenvalues (k,) descending, eigenvectors (D, k), [] (no
    iterations)."""
    import scipy.linalg

    Jt = op.rmatmat(torch.eye(op.K, dtype=op.x.dtype, device=op.x.device))  # (D, K) in the image's dtype
    small = op.K <= op.D
    Jt = Jt.double()  # a float64 Gram: a float32 one would blur eigenvalues below ~1e-7 of the first (rank < k)
    G = (Jt.T @ Jt if small else Jt @ Jt.T).cpu().numpy()
    n = G.shape[0]
    lam, U = scipy.linalg.eigh(G, subset_by_index=[n - k, n - 1])
    lam, U = lam[::-1].clip(min=0.0), U[:, ::-1]
    if not small:
        return lam, np.ascontiguousarray(U), []
    V = Jt.cpu().numpy() @ U
    ok = lam > RANK_TOL * max(float(lam[0]), np.finfo(float).tiny)  # as the rank warning counts a zero eigenvalue
    V[:, ok] /= np.linalg.norm(V[:, ok], axis=0)
    if not ok.all():  # null directions of J: complete the basis orthonormally
        V[:, ~ok] = _orthonormal_complement(torch.randn(op.D, int((~ok).sum()), dtype=torch.float64,
                                                        generator=torch.Generator().manual_seed(0)),
                                            torch.from_numpy(V[:, ok].copy())).numpy()[:, :int((~ok).sum())]
    return lam, V, []


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
    forward, name = response_function(model, layer, units, key=f"{key}.layer")
    device = device_of(model)
    D = int(np.prod(images.shape[1:]))
    vals, vecs, counts, vjps, iters = [], [], [], [], []
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if not len(images):
        raise ValueError("images is empty: give at least one image")
    with evaluation_mode(model):
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
