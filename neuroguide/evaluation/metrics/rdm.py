"""RDMs and their comparison (Kriegeskorte, Mur & Bandettini 2008): the numbers of RSA.

RDM (representational dissimilarity matrix) of a layer's activations on N stimuli, kept as its
upper triangle (the N (N - 1) / 2 pairs i < j, row-major, the order of ``scipy.spatial.distance.squareform``
and of rsatoolbox's ``RDMs.get_vectors()``):

- ``"correlation"``: ``d_ij = 1 - r(x_i, x_j)``, Pearson r between the two stimulus patterns;
- ``"euclidean"``: rsatoolbox's convention, ``d_ij = ||x_i - x_j||^2 / K`` (squared Euclidean
  distance divided by the number of features K; ``rsatoolbox.rdm.calc_rdm(method="euclidean")``
  labels it "squared euclidean"). The Euclidean distance is ``sqrt(K * d_ij)``; rank comparisons
  (Spearman, Kendall) are the same for both.

Both are Gram matrices of (centered, normalized) patterns, computed in row chunks (numpy BLAS on the CPU,
torch on another device) straight into the upper-triangle vector: memory is ``chunk_size x N`` plus the
output, never N x N x K, so 10k stimuli (50M pairs) fit in memory.

Comparison of two RDMs on their upper triangles (rsatoolbox's ``rdm.compare`` methods):

- ``"spearman"``: Pearson r of the (average, tie-corrected) ranks;
- ``"tau-a"``: Kendall's tau-a, ``(concordant - discordant) / (n (n - 1) / 2)``, no tie correction in
  the denominator (Nili et al. 2014's choice when models predict tied dissimilarities);
- ``"cosine"``: cosine similarity of the dissimilarity vectors.

An RDM is ranked once (:func:`prepare`: one sort; its standardized ranks and norm also once) and reused
for every comparison it enters, so a model-vs-model matrix over M models costs M sorts, not M^2; then a
Spearman or cosine is one dot product and a tau-a one O(n log n) count of discordant pairs in numpy
(:mod:`neuroguide.evaluation.metrics.ranks`). Positions that are NaN in either RDM (e.g. a constant pattern
has no correlation distance) are left out of that comparison.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import numpy as np
import torch

from neuroguide.evaluation.metrics.ranks import RankInfo, discordant_pairs, joint_tie_pairs, rank_info

log = logging.getLogger("neuroguide")

METHODS = ("correlation", "euclidean")
COMPARISONS = ("spearman", "tau-a", "cosine")


# ----------------------------------------------------------------------------- RDMs
def n_pairs(n: int) -> int:
    """Entries of the upper triangle of an n x n RDM."""
    return n * (n - 1) // 2


def n_stimuli(m: int) -> int:
    """The N of an upper-triangle vector with ``m`` entries (ValueError if ``m`` is not N (N - 1) / 2)."""
    n = int(round((1 + math.sqrt(1 + 8 * m)) / 2))
    if n_pairs(n) != m:
        raise ValueError(f"an RDM vector of length {m} is not the upper triangle of any square matrix "
                         "(expected N (N - 1) / 2 entries)")
    return n


def check_patterns(x, name: str = "features") -> torch.Tensor:
    """(N, K) stimulus patterns (N >= 3), or a ValueError naming ``name``; (N, ...) is flattened."""
    x = torch.as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"{name}: expected an (N stimuli, K features) matrix, got shape {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1)
    if x.shape[0] < 3:
        raise ValueError(f"{name}: an RDM needs at least 3 stimuli to compare, got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name}: patterns have no features (shape {tuple(x.shape)})")
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        finite = bool(np.isfinite(x.detach().numpy()).all())  # numpy: no torch thread pool for one pass
    else:
        finite = bool(torch.isfinite(x).all())
    if not finite:
        raise ValueError(f"{name}: {int((~torch.isfinite(x)).sum())} non-finite values in the patterns; "
                         "fix the activations or responses (e.g. average repeats with nanmean) first")
    return x


def rdm(features, method: str = "correlation", *, chunk_size: int = 1024, dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None) -> torch.Tensor:
    """Upper triangle of the RDM of ``features``.

    Args:
        features: (N, K) patterns, one row per stimulus (extra dims are flattened).
        method: "correlation" (1 - Pearson r) or "euclidean" (squared distance / K, as rsatoolbox).
        chunk_size: rows per block (at most 256 are used, so that the blocks' wasted lower triangles stay
            small); memory is ``chunk_size * N`` entries besides the output.
        dtype: computation and output dtype (float64 matches rsatoolbox to ~1e-15).
        device: where to compute (default: the device of ``features``; on the CPU the blocks are numpy BLAS
            products, which were faster than torch's on a shared CPU).
    Returns:
        (N (N - 1) / 2,) tensor on the CPU, pairs (i, j), i < j, row-major.
    """
    if method not in METHODS:
        raise ValueError(f"RDM method {method!r} is not known: expected one of {METHODS}")
    x = check_patterns(features).detach().to(device=device or torch.as_tensor(features).device, dtype=dtype)
    n, k = x.shape
    on_cpu = x.device.type == "cpu"
    xs = x.numpy() if on_cpu else x  # numpy on the CPU (BLAS products, no torch thread pool), else torch
    if method == "correlation":
        xs = xs - xs.mean(1, keepdims=True) if on_cpu else xs - xs.mean(1, keepdim=True)
        norm = np.sqrt(np.einsum("ij,ij->i", xs, xs))[:, None] if on_cpu else xs.norm(dim=1, keepdim=True)
        if (norm == 0).any():
            log.warning("RDM: %d stimuli have constant patterns; their correlation distances are NaN and are left out "
                        "of comparisons", int((norm == 0).sum()))
        with np.errstate(invalid="ignore", divide="ignore"):
            xs = xs / norm
    else:
        sq = np.einsum("ij,ij->i", xs, xs) if on_cpu else (xs * xs).sum(dim=1).cpu().numpy()
    out = np.empty(n_pairs(n), dtype=torch.empty((), dtype=dtype).numpy().dtype)
    step = max(1, min(int(chunk_size), 256))
    above = np.triu(np.ones((step, n), dtype=bool), 1)  # entry (r, c) of a block: row i = start + r, column start + c
    pos = 0
    for start in range(0, n - 1, step):
        stop = min(start + step, n - 1)
        block = xs[start:stop] @ xs[start:].T  # (c, N - start)
        block = block if on_cpu else block.cpu().numpy()
        if method == "correlation":
            np.subtract(1.0, block, out=block)
        else:
            block *= -2.0
            block += sq[start:stop, None]
            block += sq[None, start:]
            block /= k
        mask = above[:stop - start, :n - start].ravel()
        count = (n - start - 1) * (stop - start) - (stop - start) * (stop - start - 1) // 2
        np.compress(mask, block.ravel(), out=out[pos:pos + count])
        pos += count
    return torch.from_numpy(out)


def squareform(vec: torch.Tensor) -> torch.Tensor:
    """(N (N - 1) / 2,) upper triangle -> symmetric (N, N) matrix with a zero diagonal."""
    vec = torch.as_tensor(vec)
    n = n_stimuli(vec.numel())
    m = torch.zeros(n, n, dtype=vec.dtype)
    i, j = torch.triu_indices(n, n, 1)
    m[i, j] = vec
    m[j, i] = vec
    return m


def sub_rdm(vec: torch.Tensor, idx) -> torch.Tensor:
    """(k, k) square RDM of the stimuli ``idx`` (sorted, distinct) read from an upper-triangle vector,
    without building the full N x N matrix."""
    vec = torch.as_tensor(vec)
    n = n_stimuli(vec.numel())
    idx = torch.as_tensor(idx, dtype=torch.int64)
    i, j = torch.triu_indices(len(idx), len(idx), 1)
    a, b = idx[i], idx[j]
    pos = a * n - a * (a + 1) // 2 + (b - a - 1)
    m = torch.zeros(len(idx), len(idx), dtype=vec.dtype)
    m[i, j] = vec[pos]
    m[j, i] = vec[pos]
    return m


# ----------------------------------------------------------------------------- comparison
class PreparedRDM:
    """An RDM vector with what its comparisons need, each computed once (on first use) and reused by every
    comparison it enters: its ranking (:class:`~neuroguide.evaluation.metrics.ranks.RankInfo`: sorting
    order, dense ranks, ties), its standardized average ranks (Spearman) and its norm (cosine).

    Attributes:
        values: (M,) float64 tensor of dissimilarities (NaN where undefined); ``array``: the same memory
            as a numpy array.
        info: the :class:`RankInfo` (needs finite values: :func:`compare` drops NaN positions first).
        ranks: (M,) float64 tensor of average ranks (1-based; ties share their mean rank).
        tie_pairs: pairs of equal entries, sum over tie groups of t (t - 1) / 2; ``tie_cubes``: sum of t^3 - t.
    """

    def __init__(self, values: torch.Tensor):
        self.values = values
        self.array = values.numpy()
        self.all_finite = bool(np.isfinite(self.array).all())
        self._info: RankInfo | None = None
        self._z: np.ndarray | None = None
        self._norm: float | None = None

    @property
    def info(self) -> RankInfo:
        if self._info is None:
            if not self.all_finite:
                raise ValueError("ranks of an RDM with NaN entries are undefined: compare() drops NaN positions first")
            self._info = rank_info(self.array)
        return self._info

    ranks = property(lambda self: torch.from_numpy(self.info.average_ranks()))
    tie_pairs = property(lambda self: self.info.tie_pairs)
    tie_cubes = property(lambda self: self.info.tie_cubes)

    @property
    def standardized_ranks(self) -> np.ndarray | None:
        """(M,) ``(r - mean) / sqrt(S)``, r = average ranks, mean = (M + 1) / 2 and
        ``S = sum (r - mean)^2 = ((M^3 - M) - sum_groups (t^3 - t)) / 12`` (t = size of a tie group), in closed
        form; None for a constant RDM (S = 0)."""
        if self._z is None:
            m = self.array.size
            s = ((m ** 3 - m) - self.tie_cubes) / 12
            if s <= 0:
                return None
            z = self.info.average_ranks()
            z -= (m + 1) / 2
            z /= math.sqrt(s)
            self._z = z
        return self._z

    @property
    def norm(self) -> float:
        if self._norm is None:
            self._norm = math.sqrt(float(np.dot(self.array, self.array)))
        return self._norm

    @property
    def n_stimuli(self) -> int:
        return n_stimuli(self.array.size)


def prepare(vec) -> PreparedRDM:
    """An RDM vector (N (N - 1) / 2,) as a :class:`PreparedRDM` (ranked lazily); one passes through."""
    if isinstance(vec, PreparedRDM):
        return vec
    v = torch.as_tensor(vec).detach().cpu().to(torch.float64).reshape(-1).contiguous()
    if v.numel() < 3:
        raise ValueError(f"an RDM vector needs at least 3 entries (3 stimuli), got {v.numel()}")
    n_stimuli(v.numel())
    return PreparedRDM(v)


def _restricted(a: PreparedRDM, b: PreparedRDM) -> tuple[PreparedRDM, PreparedRDM]:
    """Both RDMs restricted to the entries finite in both (new objects only when something is dropped)."""
    if a.all_finite and b.all_finite:
        return a, b
    keep = np.isfinite(a.array) & np.isfinite(b.array)
    log.warning("RDM comparison: %d of %d entries are NaN in one of the RDMs and are left out",
                int((~keep).sum()), keep.size)
    if int(keep.sum()) < 3:
        raise ValueError("RDM comparison: fewer than 3 entries are finite in both RDMs (constant patterns?)")
    return PreparedRDM(torch.from_numpy(a.array[keep])), PreparedRDM(torch.from_numpy(b.array[keep]))


def _check_same_size(a: PreparedRDM, b: PreparedRDM, names: tuple[str, str]) -> None:
    if a.array.size != b.array.size:
        na, nb = n_stimuli(a.array.size), n_stimuli(b.array.size)
        raise ValueError(f"cannot compare RDMs of different stimulus sets: {names[0]} has {na} stimuli "
                         f"({a.array.size} pairs), {names[1]} has {nb} ({b.array.size} pairs). Compute both "
                         "RDMs on the same stimuli, in the same order")


def spearman(a: PreparedRDM, b: PreparedRDM) -> float:
    """Spearman's rho: the Pearson r of the average ranks, as one dot product of the two RDMs'
    :attr:`PreparedRDM.standardized_ranks` (the same number as ``neuroguide.metrics.pearson_r(ra, rb)``,
    tested, and as rsatoolbox's to ~1e-16). NaN when one RDM is constant."""
    za, zb = a.standardized_ranks, b.standardized_ranks
    if za is None or zb is None:
        return float("nan")
    return float(np.dot(za, zb))


def cosine(a: PreparedRDM, b: PreparedRDM) -> float:
    """Cosine similarity of two dissimilarity vectors (0 when one of them is all zeros, as rsatoolbox)."""
    if a.norm == 0 or b.norm == 0:
        return 0.0
    return float(np.dot(a.array, b.array)) / a.norm / b.norm


def kendall_tau_a(a: PreparedRDM, b: PreparedRDM) -> float:
    """Kendall's tau-a: ``(n_c - n_d) / (n (n - 1) / 2)``, ties count as neither (rsatoolbox's "tau-a":
    no tie correction in the denominator, Nili et al. 2014's choice when models predict tied dissimilarities).

    ``n_c - n_d = tot - ties_a - ties_b + ties_ab - 2 n_d`` (tot = all pairs; ties_ab = pairs tied in both),
    with ``n_d`` from :func:`~neuroguide.evaluation.metrics.ranks.discordant_pairs` in O(n log n): integer
    counts, so the value is rsatoolbox's exactly.
    """
    m = a.array.size
    tot = m * (m - 1) // 2
    if tot == 0:
        return float("nan")
    con_minus_dis = (tot - a.tie_pairs - b.tie_pairs + joint_tie_pairs(a.info, b.info)
                     - 2 * discordant_pairs(a.info, b.info))
    return min(1.0, max(-1.0, con_minus_dis / tot))


_COMPARE = {"spearman": spearman, "tau-a": kendall_tau_a, "cosine": cosine}


def check_comparisons(comparisons: Sequence[str] | str) -> list[str]:
    comparisons = [comparisons] if isinstance(comparisons, str) else list(comparisons)
    bad = [c for c in comparisons if c not in _COMPARE]
    if bad or not comparisons:
        raise ValueError(f"RDM comparison {bad or comparisons} is not known: expected some of {COMPARISONS}")
    return comparisons


def compare(rdm_a, rdm_b, method: str = "spearman", names: tuple[str, str] = ("rdm_a", "rdm_b")) -> float:
    """Similarity of two RDMs (vectors or :class:`PreparedRDM`) of the same stimuli by ``method``."""
    check_comparisons(method)
    a, b = prepare(rdm_a), prepare(rdm_b)
    _check_same_size(a, b, names)
    if a is b and a.all_finite:
        return _self_similarity(a, method)
    a, b = _restricted(a, b)
    return _COMPARE[method](a, b)


def _self_similarity(a: PreparedRDM, method: str) -> float:
    """An RDM compared with itself, without the O(n log n) work (tau-a < 1 when it has ties)."""
    if method == "cosine":
        return 1.0 if a.norm > 0 else 0.0
    m = a.array.size
    tot = m * (m - 1) // 2
    if method == "tau-a":
        return (tot - a.tie_pairs) / tot
    return 1.0 if a.tie_pairs < tot else float("nan")


def compare_all(rdms: Mapping[str, object], comparisons: Sequence[str] = COMPARISONS,
                others: Mapping[str, object] | None = None) -> dict[str, np.ndarray]:
    """Matrices of RDM similarities: ``{comparison: (len(rdms), len(others)) array}``.

    ``others`` defaults to ``rdms`` (a symmetric model-vs-model matrix; each pair is computed once).
    Every RDM is ranked once.
    """
    comparisons = check_comparisons(comparisons)
    rows = {k: prepare(v) for k, v in rdms.items()}
    symmetric = others is None
    cols = rows if symmetric else {k: prepare(v) for k, v in others.items()}
    out = {c: np.full((len(rows), len(cols)), np.nan) for c in comparisons}
    for i, (ka, a) in enumerate(rows.items()):
        for j, (kb, b) in enumerate(cols.items()):
            if symmetric and j < i:
                continue
            for c in comparisons:
                v = compare(a, b, c, names=(ka, kb))
                out[c][i, j] = v
                if symmetric:
                    out[c][j, i] = v
    return out



def check_responses(responses, n: int) -> dict[str, torch.Tensor]:
    """``{region: (N, V)}`` measured responses to N stimuli (a bare tensor is called "region"; (N, V, repeats)
    is averaged over repeats with NaN for missing ones), or a ValueError naming the region and the fix."""
    if responses is None:
        return {}
    if not isinstance(responses, Mapping):
        responses = {"region": responses}
    out = {}
    for region, r in responses.items():
        r = torch.as_tensor(r)
        if r.ndim == 3:  # (N, V, repeats) with NaN for missing repeats
            r = r.nanmean(dim=-1)
        r = check_patterns(r, f"responses[{region!r}]")
        if r.shape[0] != n:
            raise ValueError(f"responses[{region!r}] has {r.shape[0]} stimuli but the images are {n}: give one "
                             "response row per image, in the order of the images")
        out[str(region)] = r
    return out

