"""Representational similarity analysis (Kriegeskorte, Mur & Bandettini 2008).

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

MDS pictures use classical (Torgerson) MDS by eigendecomposition on ``sqrt(d)``: for both RDM
kinds ``sqrt(d)`` is proportional to a Euclidean distance between (normalized) patterns, so the
embedding is exact up to the dropped dimensions.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


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
    def sorted_dense(self) -> torch.Tensor:
        """``dense[order]``: the dense ranks in ascending order (1, 2, ..., M without ties)."""
        g = self._ranked()[5]
        return torch.arange(1, self.values.numel() + 1) if g is None else g

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
    """(average ranks, dense ranks, sorting order, tied pairs, sum of t^3 - t, dense ranks in sorted order)
    of a finite 1-D float64 tensor; without ties the first and last are None (they follow from the others)."""
    m = v.numel()
    sv, order = torch.sort(v)
    tied = sv[1:] == sv[:-1]
    if not bool(tied.any()):  # the usual case for continuous dissimilarities: rank = position + 1
        dense = torch.empty(m, dtype=torch.int64)
        dense[order] = torch.arange(1, m + 1)
        return None, dense, order, 0, 0.0, None
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
    return ranks, dense, order, int((counts * (counts - 1) // 2).sum()), float((c ** 3 - c).sum()), gid


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


def _discordant_pairs(x: np.ndarray, y: np.ndarray) -> int:
    """Pairs (i, j) with ``x_i < x_j`` and ``y_i > y_j``; ``x`` sorted ascending, both dense 1-based ranks.

    scipy's compiled merge count (the one ``scipy.stats.kendalltau`` and rsatoolbox use), pairs
    within a group of equal ``x`` are not counted.
    """
    from scipy.stats._stats import _kendall_dis

    return int(_kendall_dis(np.ascontiguousarray(x, dtype=np.intp), np.ascontiguousarray(y, dtype=np.intp)))


def _joint_tie_pairs(a: PreparedRDM, b: PreparedRDM) -> int:
    """Pairs of entries tied in both RDMs."""
    if a.tie_pairs == 0 or b.tie_pairs == 0:
        return 0
    key = a.dense * (int(b.dense.max()) + 1) + b.dense
    counts = torch.unique(key, return_counts=True)[1]
    return int((counts * (counts - 1) // 2).sum())


def kendall_tau_a(a: PreparedRDM, b: PreparedRDM) -> float:
    """Kendall's tau-a: ``(n_c - n_d) / (n (n - 1) / 2)``, ties count as neither.

    ``n_c - n_d = tot - ties_a - ties_b + ties_ab - 2 n_d`` (tot = all pairs; ties_ab = pairs tied in
    both), with ``n_d`` counted in O(n log n) along ``a``'s sorting order (no second sort).
    """
    m = a.values.numel()
    tot = m * (m - 1) // 2
    if tot == 0:
        return float("nan")
    x = a.sorted_dense.numpy()
    y = b.dense[a.order].numpy()
    try:
        dis = _discordant_pairs(x, y)
    except ImportError:  # scipy moved its private helper: same number from the public tau-b
        return _tau_a_from_tau_b(a, b)
    con_minus_dis = tot - a.tie_pairs - b.tie_pairs + _joint_tie_pairs(a, b) - 2 * dis
    return min(1.0, max(-1.0, con_minus_dis / tot))


def _tau_a_from_tau_b(a: PreparedRDM, b: PreparedRDM) -> float:
    """tau-a from ``scipy.stats.kendalltau`` (tau-b): ``n_c - n_d = tau_b sqrt((tot - ties_a)(tot - ties_b))``."""
    from scipy.stats import kendalltau

    m = a.values.numel()
    tot = m * (m - 1) // 2
    if a.tie_pairs == tot or b.tie_pairs == tot:
        return 0.0  # one RDM is constant: no pair is concordant or discordant
    tau_b = kendalltau(a.dense.numpy(), b.dense.numpy()).statistic
    return float(tau_b * math.sqrt((tot - a.tie_pairs) * (tot - b.tie_pairs)) / tot)


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


# ----------------------------------------------------------------------------- activations
def activations(model: nn.Module, images: torch.Tensor, layers: Sequence[str | None], *, batch_size: int = 128,
                progress: bool = False) -> dict[str, torch.Tensor]:
    """(N, K) float32 CPU activations of each named layer (None or "output": the model's output).

    The model runs in eval mode (restored afterwards) under ``torch.no_grad``.
    """
    from neuroguide.attacks.pgd import evaluation_mode
    from neuroguide.models.features import capture, get_layer

    names = [_layer_name(l) for l in layers]
    hooked = [n for n in names if n != "output"]
    for n in hooked:
        get_layer(model, n)  # KeyError listing the valid names
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    starts = range(0, len(images), batch_size)
    with evaluation_mode(model), torch.no_grad():
        for i in tqdm(starts, desc="activations", disable=not progress, leave=False):
            xb = images[i:i + batch_size].to(device)
            with capture(model, hooked) as out:
                y = model(xb)
            for n in names:
                a = y if n == "output" else out[n]
                chunks[n].append(a.reshape(a.shape[0], -1).float().cpu())
    return {n: torch.cat(v) for n, v in chunks.items()}


def _layer_name(layer: str | None) -> str:
    return "output" if layer in (None, "", "output") else str(layer)


# ----------------------------------------------------------------------------- MDS and figures
def classical_mds(dist: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """Classical (Torgerson) MDS: (N, N) distances -> (N, dims) coordinates.

    ``B = -1/2 J D^2 J`` (J the centering matrix), coordinates = top eigenvectors x sqrt(eigenvalues);
    negative eigenvalues (non-Euclidean input) are set to 0.
    """
    d = torch.as_tensor(dist, dtype=torch.float64)
    n = d.shape[0]
    if d.ndim != 2 or d.shape[1] != n:
        raise ValueError(f"classical_mds: expected a square distance matrix, got shape {tuple(d.shape)}")
    j = torch.eye(n, dtype=torch.float64) - 1.0 / n
    b = -0.5 * j @ (d * d) @ j
    evals, evecs = torch.linalg.eigh((b + b.T) / 2)
    idx = torch.argsort(evals, descending=True)[:dims]
    return evecs[:, idx] * evals[idx].clamp(min=0).sqrt()


def rdm_mds(vec: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """Stimulus coordinates (N, dims) of an RDM by classical MDS on ``sqrt(d)`` (see the module docstring).

    Builds the N x N matrix: for large N take a :func:`sub_rdm` first.
    """
    v = torch.as_tensor(vec, dtype=torch.float64)
    v = torch.nan_to_num(v, nan=float(torch.nanmean(v)) if torch.isfinite(v).any() else 0.0)
    return classical_mds(squareform(v.clamp(min=0).sqrt()), dims)


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


def _rdm_figure(rdms: Mapping[str, torch.Tensor], labels, path: Path, max_show: int = 400) -> None:
    """Each RDM (rank-transformed, as a percentile image) above the classical MDS of its stimuli
    (at most ``max_show`` stimuli, evenly spaced, are drawn)."""
    from neuroguide.evaluation.plots import plt, save_figure

    names = list(rdms)
    fig, axes = plt.subplots(2, len(names), figsize=(3.8 * len(names), 7.2), squeeze=False)
    for col, name in enumerate(names):
        v = torch.as_tensor(rdms[name], dtype=torch.float64)
        n = n_stimuli(v.numel())
        show = np.unique(np.linspace(0, n - 1, min(n, max_show)).round().astype(int))
        sub = sub_rdm(v, show)
        iu = np.triu_indices(len(show), 1)
        vals = sub.numpy()[iu]
        pct = np.zeros((len(show), len(show)))
        pct[iu] = np.argsort(np.argsort(vals)) / max(1, len(vals) - 1)
        pct = pct + pct.T
        ax = axes[0, col]
        ax.imshow(pct, cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{name}\nRDM (percentile), {n} stimuli", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        sub = torch.nan_to_num(sub, nan=float(np.nanmean(vals)) if np.isfinite(vals).any() else 0.0)
        xy = classical_mds(sub.clamp(min=0).sqrt()).numpy()
        ax = axes[1, col]
        c = None if labels is None else torch.as_tensor(labels).cpu().numpy()[show]
        ax.scatter(xy[:, 0], xy[:, 1], s=8, c=c, cmap="tab20" if c is not None else None)
        ax.set_title("classical MDS of the stimuli", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path)


def _model_mds_figure(sim: np.ndarray, names: Sequence[str], path: Path, title: str) -> None:
    """Second-order MDS: one point per RDM, distance 1 - similarity."""
    from neuroguide.evaluation.plots import plt, save_figure

    d = torch.as_tensor(np.nan_to_num(1.0 - sim, nan=1.0))
    d = (d + d.T) / 2
    d.fill_diagonal_(0)
    xy = classical_mds(d.clamp(min=0)).numpy()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(xy[:, 0], xy[:, 1])
    for (x, y), name in zip(xy, names):
        ax.annotate(name, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    save_figure(fig, path)


# ----------------------------------------------------------------------------- evaluate
def _check_responses(responses, n: int) -> dict[str, torch.Tensor]:
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


def evaluate(model: nn.Module, images: torch.Tensor, out_dir: str | os.PathLike, *,
             layers: str | Sequence[str | None] | None = None, responses=None, method: str = "correlation",
             comparisons: Sequence[str] = COMPARISONS, labels=None, batch_size: int = 128, chunk_size: int = 1024,
             key_prefix: str = "eval/rsa", progress: bool = True) -> dict:
    """RSA of one model against measured responses of one or more regions.

    Args:
        model: takes (B, 3, H, W) in [0, 1].
        images: (N, 3, H, W) stimuli.
        layers: one layer name or a list (None / "output": the model output, e.g. a predictor's voxels).
        responses: ``{region: (N, V) or (N, V, repeats)}`` measured responses to the same images
            (a bare tensor is called "region").
        method: RDM method, "correlation" or "euclidean".
        comparisons: any of "spearman", "tau-a", "cosine".
        labels: optional (N,) class labels, used only to colour the MDS figure.
    Returns:
        ``{key_prefix}/{region}/{comparison}`` (one layer) or ``{key_prefix}/{region}/{layer}/{comparison}``
        (several layers). Writes ``rsa.csv`` and ``rsa_rdms.png`` (RDMs and MDS) into ``out_dir``.
    """
    comparisons = check_comparisons(comparisons)
    layer_list = [layers] if layers is None or isinstance(layers, str) else list(layers)
    resp = _check_responses(responses, len(images))
    acts = activations(model, images, layer_list, batch_size=batch_size, progress=progress)
    model_rdms = {n: rdm(a, method, chunk_size=chunk_size) for n, a in acts.items()}
    region_rdms = {r: rdm(v, method, chunk_size=chunk_size) for r, v in resp.items()}
    metrics, rows = {}, []
    if region_rdms:
        sims = compare_all(model_rdms, comparisons, others=region_rdms)
        for i, layer in enumerate(model_rdms):
            for j, region in enumerate(region_rdms):
                for c in comparisons:
                    v = float(sims[c][i, j])
                    key = f"{key_prefix}/{region}/{c}" if len(model_rdms) == 1 else f"{key_prefix}/{region}/{layer}/{c}"
                    metrics[key] = v
                    rows.append({"region": region, "layer": layer, "comparison": c, "value": v,
                                 "method": method, "n_stimuli": len(images)})
    else:
        log.info("rsa: no measured responses given; writing the model RDM figure only")
    out_dir = Path(out_dir)
    from neuroguide.evaluation.plots import write_csv

    write_csv(out_dir / "rsa.csv", rows, ["region", "layer", "comparison", "value", "method", "n_stimuli"])
    _rdm_figure({**{f"model {k}": v for k, v in model_rdms.items()}, **{f"region {k}": v for k, v in region_rdms.items()}},
                labels, out_dir / "rsa_rdms.png")
    return metrics


def evaluate_models(models: Mapping[str, nn.Module], images: torch.Tensor, out_dir: str | os.PathLike, *,
                    layer: str | Mapping[str, str | None] | None = None, responses=None, method: str = "correlation",
                    comparisons: Sequence[str] = COMPARISONS, batch_size: int = 128, chunk_size: int = 1024,
                    key_prefix: str = "eval/rsa", progress: bool = True) -> dict:
    """Model-vs-model RSA (and each model against each region, when ``responses`` are given).

    Args:
        models: ``{name: model}``, all run on the same ``images``.
        layer: one layer name for all models, or ``{name: layer}``.
    Returns:
        ``{key_prefix}/model_vs_model/{a}/{b}/{comparison}`` for each pair a before b in ``models``
        order, and ``{key_prefix}/{region}/{model}/{comparison}``. Writes ``rsa_model_vs_model.csv``
        (every pair, both orders), ``rsa_model_vs_model.png`` (heatmaps) and ``rsa_models_mds.png``
        (second-order MDS of the models and regions, distance 1 - Spearman or the first comparison).
    """
    from neuroguide.evaluation.plots import heatmap_figure, write_csv

    comparisons = check_comparisons(comparisons)
    if len(models) < 2 and responses is None:
        raise ValueError(f"model-vs-model RSA needs at least 2 models, got {len(models)} ({list(models)})")
    resp = _check_responses(responses, len(images))
    rdms = {}
    for name, m in tqdm(models.items(), desc="RDMs", disable=not progress, leave=False):
        lay = layer.get(name) if isinstance(layer, Mapping) else layer
        a = activations(m, images, [lay], batch_size=batch_size)[_layer_name(lay)]
        rdms[name] = prepare(rdm(a, method, chunk_size=chunk_size))
    region_rdms = {r: prepare(rdm(v, method, chunk_size=chunk_size)) for r, v in resp.items()}
    everything = {**rdms, **{f"region {r}": v for r, v in region_rdms.items()}}
    sims = compare_all(everything, comparisons)
    names = list(everything)
    metrics, rows = {}, []
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            for c in comparisons:
                rows.append({"a": a, "b": b, "comparison": c, "value": float(sims[c][i, j])})
            if i < j and a in rdms and b in rdms:
                for c in comparisons:
                    metrics[f"{key_prefix}/model_vs_model/{a}/{b}/{c}"] = float(sims[c][i, j])
            if a in rdms and b.startswith("region ") and b[7:] in region_rdms:
                for c in comparisons:
                    metrics[f"{key_prefix}/{b[7:]}/{a}/{c}"] = float(sims[c][i, j])
    out_dir = Path(out_dir)
    write_csv(out_dir / "rsa_model_vs_model.csv", rows, ["a", "b", "comparison", "value"])
    heatmap_figure([(c, sims[c]) for c in comparisons], names, names, out_dir / "rsa_model_vs_model.png",
                   xlabel="", ylabel="", cbar_label="RDM similarity", title=f"RSA ({method} RDMs), {len(images)} stimuli")
    main = "spearman" if "spearman" in comparisons else comparisons[0]
    if len(names) >= 3:
        _model_mds_figure(sims[main], names, out_dir / "rsa_models_mds.png", f"models by RDM similarity (1 - {main})")
    return metrics
