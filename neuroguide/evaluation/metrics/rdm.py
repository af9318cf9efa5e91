"""RDMs and their comparison (Kriegeskorte, Mur & Bandettini 2008): the numbers of RSA.

RDM (representational dissimilarity matrix) of a layer's activations on N stimuli, kept as its
upper triangle (the N (N - 1) / 2 pairs i < j, row-major, the order of ``scipy.spatial.distance.squareform``
and of rsatoolbox's ``RDMs.get_vectors()``):

- ``"correlation"``: ``d_ij = 1 - r(x_i, x_j)``, Pearson r between the two stimulus patterns;
- ``"euclidean"``: rsatoolbox's convention, ``d_ij = ||x_i - x_j||^2 / K`` (squared Euclidean
  distance divided by the number of features K; ``rsatoolbox.rdm.calc_rdm(method="euclidean")``
  labels it "squared euclidean"). The Euclidean distance is ``sqrt(K * d_ij)``; rank comparisons
  (Spearman, Kendall) are the same for both.

Both are Gram matrices of (centered, normalized) patterns, computed in torch in row chunks straight
into the upper-triangle vector: memory is ``chunk_size x N`` plus the output, never N x N x K, so
10k stimuli (50M pairs) fit in memory.

Comparison of two RDMs on their upper triangles (rsatoolbox's ``rdm.compare`` methods):

- ``"spearman"``: Pearson r of the (average, tie-corrected) ranks;
- ``"tau-a"``: Kendall's tau-a, ``(concordant - discordant) / (n (n - 1) / 2)``, no tie correction in
  the denominator (Nili et al. 2014's choice when models predict tied dissimilarities);
- ``"cosine"``: cosine similarity of the dissimilarity vectors.

An RDM is ranked once (:func:`prepare`) and reused for every comparison it enters, so a
model-vs-model matrix over M models costs M sorts, not M^2. Positions that are NaN in either RDM
(e.g. a constant pattern has no correlation distance) are left out of that comparison.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import numpy as np
import torch

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
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: {int((~torch.isfinite(x)).sum())} non-finite values in the patterns; "
                         "fix the activations or responses (e.g. average repeats with nanmean) first")
    return x


def rdm(features, method: str = "correlation", *, chunk_size: int = 1024, dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None) -> torch.Tensor:
    """Upper triangle of the RDM of ``features``.

    Args:
        features: (N, K) patterns, one row per stimulus (extra dims are flattened).
        method: "correlation" (1 - Pearson r) or "euclidean" (squared distance / K, as rsatoolbox).
        chunk_size: rows per block; memory is ``chunk_size * N`` entries besides the output.
        dtype: computation and output dtype (float64 matches rsatoolbox to ~1e-12).
        device: where to compute (default: the device of ``features``).
    Returns:
        (N (N - 1) / 2,) tensor on the CPU, pairs (i, j), i < j, row-major.
    """
    if method not in METHODS:
        raise ValueError(f"RDM method {method!r} is not known: expected one of {METHODS}")
    x = check_patterns(features).to(device=device or torch.as_tensor(features).device, dtype=dtype)
    n, k = x.shape
    if method == "correlation":
        x = x - x.mean(dim=1, keepdim=True)
        norm = x.norm(dim=1, keepdim=True)
        if (norm == 0).any():
            log.warning("RDM: %d stimuli have constant patterns; their correlation distances are NaN and are left out "
                        "of comparisons", int((norm == 0).sum()))
        x = x / norm
    else:
        sq = (x * x).sum(dim=1)
    out = torch.empty(n_pairs(n), dtype=dtype)
    chunk_size = max(1, int(chunk_size))
    pos = 0
    for start in range(0, n - 1, chunk_size):
        stop = min(start + chunk_size, n - 1)
        block = x[start:stop] @ x[start:].T  # (c, N - start): rows i = start.., columns j = start..
        if method == "correlation":
            block = 1.0 - block
        else:
            block = (sq[start:stop, None] + sq[None, start:] - 2.0 * block) / k
        mask = torch.ones(block.shape, dtype=torch.bool, device=block.device).triu_(1)
        vals = block[mask]
        out[pos:pos + vals.numel()] = vals.cpu()
        pos += vals.numel()
    return out


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
    """An RDM vector whose ranks are computed once (on first use) and reused by every comparison.

    Attributes:
        values: (M,) float64 dissimilarities (NaN where undefined).
        ranks: (M,) average ranks (1-based, ties share their mean rank).
        dense: (M,) int64 dense ranks (1-based: equal values share a rank, no gaps).
        order: (M,) int64 permutation sorting ``values`` ascending.
        tie_pairs: pairs of equal entries, sum over tie groups of t (t - 1) / 2.
        tie_cubes: sum over tie groups of t^3 - t (the Spearman tie correction).
    The rank attributes need finite values (see :func:`compare`, which drops NaN positions first).
    """

    def __init__(self, values: torch.Tensor):
        self.values = values
        self.all_finite = bool(torch.isfinite(values).all())
        self._rank_info: tuple | None = None

    def _ranked(self) -> tuple:
        if self._rank_info is None:
            if not self.all_finite:
                raise ValueError("ranks of an RDM with NaN entries are undefined: compare() drops NaN positions first")
            self._rank_info = _ranks(self.values)
        return self._rank_info

    @property
    def ranks(self) -> torch.Tensor:
        r = self._ranked()[0]
        return self.dense.to(torch.float64) if r is None else r  # no ties: rank = dense rank (not stored)

    dense = property(lambda self: self._ranked()[1])
    order = property(lambda self: self._ranked()[2])
    tie_pairs = property(lambda self: self._ranked()[3])
    tie_cubes = property(lambda self: self._ranked()[4])

    @property
    def n_stimuli(self) -> int:
        return n_stimuli(self.values.numel())

    @property
    def finite(self) -> torch.Tensor:
        return torch.isfinite(self.values)


def prepare(vec) -> PreparedRDM:
    """An RDM vector (N (N - 1) / 2,) as a :class:`PreparedRDM` (ranked lazily); one passes through."""
    if isinstance(vec, PreparedRDM):
        return vec
    v = torch.as_tensor(vec).detach().cpu().to(torch.float64).reshape(-1)
    if v.numel() < 3:
        raise ValueError(f"an RDM vector needs at least 3 entries (3 stimuli), got {v.numel()}")
    n_stimuli(v.numel())
    return PreparedRDM(v)


def _ranks(v: torch.Tensor) -> tuple:
    """(average ranks, dense ranks, sorting order, tied pairs, sum of t^3 - t) of a finite 1-D float64
    tensor (M,); without ties the average ranks are None (they equal the dense ranks)."""
    m = v.numel()
    sv, order = torch.sort(v)
    tied = sv[1:] == sv[:-1]
    if not bool(tied.any()):  # the usual case for continuous dissimilarities: rank = position + 1
        dense = torch.empty(m, dtype=torch.int64)
        dense[order] = torch.arange(1, m + 1)
        return None, dense, order, 0, 0.0
    new = torch.ones(m, dtype=torch.bool)
    new[1:] = ~tied
    gid = torch.cumsum(new, 0)  # dense rank (1-based) in sorted order
    starts = torch.nonzero(new).squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([m])])
    counts = ends - starts
    avg = (starts + ends - 1).to(torch.float64) / 2 + 1  # mean 1-based position of each tie group
    dense = torch.empty(m, dtype=torch.int64)
    dense[order] = gid
    ranks = avg[dense - 1]
    c = counts.to(torch.float64)
    return ranks, dense, order, int((counts * (counts - 1) // 2).sum()), float((c ** 3 - c).sum())


def _restricted(a: PreparedRDM, b: PreparedRDM) -> tuple[PreparedRDM, PreparedRDM]:
    """Both RDMs restricted to the entries finite in both (new objects only when something is dropped)."""
    if a.all_finite and b.all_finite:
        return a, b
    keep = a.finite & b.finite
    log.warning("RDM comparison: %d of %d entries are NaN in one of the RDMs and are left out",
                int((~keep).sum()), keep.numel())
    if int(keep.sum()) < 3:
        raise ValueError("RDM comparison: fewer than 3 entries are finite in both RDMs (constant patterns?)")
    return PreparedRDM(a.values[keep]), PreparedRDM(b.values[keep])


def _check_same_size(a: PreparedRDM, b: PreparedRDM, names: tuple[str, str]) -> None:
    if a.values.numel() != b.values.numel():
        na, nb = n_stimuli(a.values.numel()), n_stimuli(b.values.numel())
        raise ValueError(f"cannot compare RDMs of different stimulus sets: {names[0]} has {na} stimuli "
                         f"({a.values.numel()} pairs), {names[1]} has {nb} ({b.values.numel()} pairs). Compute both "
                         "RDMs on the same stimuli, in the same order")


def spearman(a: PreparedRDM, b: PreparedRDM) -> float:
    """Spearman's rho: the Pearson r of the average ranks, from rank moments in one dot product.

    Average ranks always have mean (m + 1) / 2 and sum of squared deviations
    ``(m^3 - m) / 12 - sum_groups (t^3 - t) / 12`` (t = size of a tie group), so
    ``rho = sum (ra - mean)(rb - mean) / sqrt(S_a S_b)``: the same number as
    ``neuroguide.metrics.pearson_r(ra, rb)`` (tested), without its second pass over both vectors.
    NaN when one RDM is constant.
    """
    m = a.values.numel()
    mean = (m + 1) / 2
    s_a = ((m ** 3 - m) - a.tie_cubes) / 12
    s_b = ((m ** 3 - m) - b.tie_cubes) / 12
    if s_a <= 0 or s_b <= 0:
        return float("nan")
    return float(torch.dot(a.ranks - mean, b.ranks - mean) / math.sqrt(s_a * s_b))


def cosine(a: PreparedRDM, b: PreparedRDM) -> float:
    """Cosine similarity of two dissimilarity vectors (0 when one of them is all zeros, as rsatoolbox)."""
    na, nb = a.values.norm(), b.values.norm()
    if na == 0 or nb == 0:
        return 0.0
    return float(a.values @ b.values / (na * nb))


def _joint_tie_pairs(a: PreparedRDM, b: PreparedRDM) -> int:
    """Pairs of entries tied in both RDMs."""
    if a.tie_pairs == 0 or b.tie_pairs == 0:
        return 0
    key = a.dense * (int(b.dense.max()) + 1) + b.dense
    counts = torch.unique(key, return_counts=True)[1]
    return int((counts * (counts - 1) // 2).sum())


def _discordant_pairs(a: PreparedRDM, b: PreparedRDM) -> int:
    """Pairs of entries (i, j) ordered oppositely by the two RDMs (``a_i < a_j`` and ``b_i > b_j``, or
    the reverse); a pair tied in either RDM is not counted. ``a``, ``b``: (M,) finite, same M.

    From the public ``scipy.stats.kendalltau`` (tau-b, an O(M log M) merge count) and the tie counts
    the RDMs already carry: ``n_c - n_d = tau_b sqrt((tot - ties_a)(tot - ties_b))`` and
    ``n_c + n_d = tot - ties_a - ties_b + ties_ab`` (tot = all pairs; ties_ab = pairs tied in both), so
    ``n_d = (n_c + n_d - (n_c - n_d)) / 2``, rounded (exact: every term is an integer below 2^53, the
    float error of tau_b is ~1e-16 of tot).
    """
    from scipy.stats import kendalltau

    m = a.values.numel()
    tot = m * (m - 1) // 2
    if a.tie_pairs == tot or b.tie_pairs == tot:
        return 0  # one RDM is constant: no pair is ordered by it
    tau_b = float(kendalltau(a.dense.numpy(), b.dense.numpy(), method="asymptotic").statistic)
    con_minus_dis = tau_b * math.sqrt(tot - a.tie_pairs) * math.sqrt(tot - b.tie_pairs)
    con_plus_dis = tot - a.tie_pairs - b.tie_pairs + _joint_tie_pairs(a, b)
    return int(round((con_plus_dis - con_minus_dis) / 2))


def kendall_tau_a(a: PreparedRDM, b: PreparedRDM) -> float:
    """Kendall's tau-a: ``(n_c - n_d) / (n (n - 1) / 2)``, ties count as neither.

    ``n_c - n_d = tot - ties_a - ties_b + ties_ab - 2 n_d`` (tot = all pairs; ties_ab = pairs tied in
    both), with ``n_d`` from :func:`_discordant_pairs` in O(n log n).
    """
    m = a.values.numel()
    tot = m * (m - 1) // 2
    if tot == 0:
        return float("nan")
    con_minus_dis = tot - a.tie_pairs - b.tie_pairs + _joint_tie_pairs(a, b) - 2 * _discordant_pairs(a, b)
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
        return 1.0 if bool((a.values != 0).any()) else 0.0
    m = a.values.numel()
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

