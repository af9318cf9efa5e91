"""The solvers of :mod:`neuroguide.evaluation.analyses.subspace.core`: the top eigenpairs of ``J^T J`` for one
model's response at a batch of images, by block Krylov (:func:`block_krylov_top`), ARPACK (:func:`eigsh_top`) or
the explicit Jacobian (:func:`explicit_top`), all fed by one :class:`GramOperator`; :func:`choose_method` picks
one by K (see the core module's docstring for the methods and their costs)."""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from neuroguide.evaluation.analyses.subspace.forward_mode import DualBuffers

log = logging.getLogger("neuroguide")

METHODS = ("auto", "block", "eigsh", "explicit")
SOLVERS = METHODS[1:]

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
        self._dual = DualBuffers(forward)

    def _rvjp(self, U: torch.Tensor) -> torch.Tensor:
        """(c, N, K) cotangents -> (c, N, 3, S, S) ``J^T u``: one batched backward pass through the kept graph."""
        if U.shape[0] == 1:
            return self._vjp(U[0])[0][None]
        return torch.func.vmap(lambda u: self._vjp(u)[0])(U)

    def _gram(self, T: torch.Tensor) -> torch.Tensor:
        """(c, N, 3, S, S) -> (c, N, 3, S, S) ``J^T J t``. A block: one vmapped call of ``torch.func.jvp`` over the
        tangents only (the primal pass runs once, unbatched over c; 1.5-2x faster than forward AD on c copies of the
        images here) and of the VJP through the kept graph. The JVP is :meth:`DualBuffers.jvp` (the normalization's
        and folded batch norms' buffers dual: no efficient-zero tangents)."""
        if T.shape[0] == 1 and self.N == 1:
            return self._rvjp(self._dual.jvp(self.forward, self.x, T[0])[None])
        return torch.func.vmap(lambda t: self._vjp(self._dual.jvp(self.forward, self.x, t))[0])(T)

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


def _orthonormal_complement(W: torch.Tensor, Q: torch.Tensor | None, rel: float = 1e-7) -> torch.Tensor:
    """(D, m) -> (D, m') orthonormal basis of the part of span(W) orthogonal to Q (D, n; orthonormal columns),
    twice projected out and orthonormalized ("twice is enough"); directions below ``rel`` of W's largest column are
    dropped (the products are float32: a direction within ~1e-7 of the basis brings nothing new).

    Each orthonormalization is SVQB (Stathopoulos & Wu 2002, as in LOBPCG codes): ``W = U S V^T`` from the
    eigenpairs of the small Gram matrix ``W^T W`` (m x m), ``U = W V S^-1``; a fifth of the cost of an SVD of W at
    D = 12288. The Gram matrix resolves singular values down to ~1e-8 of the largest in float64, below ``rel``."""
    scale = float(W.norm(dim=0).max()) if W.numel() else 0.0
    for _ in range(2):
        if Q is not None and Q.shape[1]:
            W = W - Q @ (Q.T @ W)
        if not W.numel():
            break
        s2, V = torch.linalg.eigh(W.T @ W)
        keep = s2 > (rel * max(scale, np.finfo(float).tiny)) ** 2
        W = W @ (V[:, keep] / s2[keep].sqrt())
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
    Hs = [Q.T @ AQ for Q, AQ in zip(Qs, AQs)]  # Q^T A Q, grown by its new blocks only (the cost was O(D m^2))
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
            Q, AQ, H = Qs[n], AQs[n], Hs[n]
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
                Qs[n], AQs[n], Hs[n] = V, AV, V.T @ AV
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
            C, E = Qs[n].T @ AN[i, :, :c], new[n].T @ AN[i, :, :c]  # the new blocks of Q^T A Q (A symmetric)
            Hs[n] = torch.cat([torch.cat([Hs[n], C], 1), torch.cat([C.T, E], 1)], 0)
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
